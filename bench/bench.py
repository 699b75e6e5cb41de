"""`make bench`: the service's figures next to a baseline measured in the same run.

Starts everything itself on free loopback ports, in temporary directories, and stops it all:

- `bench/baseline.py`, the smallest honest server of the same line protocol (see its text);
- `callpolicy serve` exactly as an operator runs it: the shipped `service.toml` (snapshots on,
  every 10 s; default timeouts; rule watching; JSON log lines to a file) with only the
  listeners moved to free ports and metrics off; the embedded store, then Redis (a private
  `redis-server`), then a private Redis Cluster (3 primaries), then a RADIUS listener added;
- `bench/loadgen.py` for every measurement, in a process of its own.

Before measuring, every server gets a background of `--held` calls (default 100,000): checked
and answered (active, 12 h lease), each from its own user with no account, so they never reach
a cap nor block the measured calls. Nothing is pinned unless `--pin` says so (then printed).

Each figure is the median of `--runs` runs (default 3) with its min-max; the baseline's runs
are interleaved with the service's (baseline run, service run, ...) and every throughput is
printed as a ratio to the baseline's, every open-loop p99 as a multiple of the baseline's.
Closed-loop runs are longer than the snapshot interval, so a snapshot falls inside each.
Every reply is checked (see loadgen.py); any error or lost reply is printed, marks its row,
and makes the bench exit with status 1. `bench/results.json` gets everything (runs, medians,
errors, settings, machine).

Around every service run the bench reads the service's `stats` (loop-lag probe, compactions):
the loop's longest stall per scenario and the headline (bench/lag.py). The Redis section ends
with the outage phases (bench/faults.py): Redis up, SIGSTOPped, SIGKILLed, restarted empty.

    .venv/bin/python bench/bench.py [--quick] [--only embedded,redis,outages,cluster,radius] [--runs 3] [--pin]
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import math
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from collections import Counter
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import orjson

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(ROOT))

from faults import report as outages_report  # noqa: E402
from lag import report as lag_report  # noqa: E402
from lag import summarize_runs as summarize_loop  # noqa: E402

from tests.helpers import LineClient, RedisServer, free_port  # noqa: E402

SECTIONS = ("embedded", "redis", "outages", "cluster", "radius")  # outages run inside redis when both are chosen
RADIUS_SECRET = "bench-secret"
#: Cores two services on one port need besides Redis and the load generator to show any scaling.
TWO_PROCESS_CORES = 4


# -- processes ---------------------------------------------------------------------------------

class Proc:
    """A process this bench started (stopped in a finally, never left behind)."""

    def __init__(self, name: str, popen: subprocess.Popen[bytes], workdir: Path, log: Path, **info: Any) -> None:
        self.name = name
        self.popen = popen
        self.workdir = workdir
        self.log = log
        self.info = info

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, timeout: float = 60.0) -> None:
        """SIGTERM (the embedded store writes its snapshot), then SIGKILL if it hangs."""
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()

    def tail(self, n: int = 2000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""


def _listening(log: Path, pid: int) -> bool:
    """Has process `pid` logged its `listening` line (so a ping reaches it, not a stranger)?"""
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return False
    for line in text.splitlines():
        if '"listening"' in line:
            with contextlib.suppress(orjson.JSONDecodeError):
                ev = orjson.loads(line)
                if ev.get("event") == "listening" and ev.get("pid") == pid:
                    return True
    return False


def _ping(port: int | None = None, unix: str | None = None) -> bool:
    try:
        c = LineClient(port=port or 0, unix=unix, timeout=1.0)
    except OSError:
        return False
    try:
        return bool(c.call("ping").get("ok"))
    except (OSError, ValueError):
        return False
    finally:
        c.close()


def _wait_ready(proc: Proc, port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.tail()}")
        if _listening(proc.log, proc.pid) and _ping(port):
            return
        time.sleep(0.05)
    proc.stop()
    raise RuntimeError(f"{proc.name} did not start:\n{proc.tail()}")


def callpolicy_argv() -> list[str]:
    """The installed console script next to this Python, as an operator would run it."""
    script = Path(sys.executable).parent / "callpolicy"
    return [str(script)] if script.exists() else [sys.executable, "-m", "policy"]


def service_config(work: Path, *, reuse_port: bool = False, radius: tuple[int, int] | None = None) -> Path:
    """The shipped service.toml, copied into `work` (so its relative paths - snapshot, socket -
    land there), with reuse_port and a [radius] table when asked; nothing else changes."""
    text = (ROOT / "service.toml").read_text()
    if reuse_port:
        text, n = re.subn(r"(?m)^reuse_port\s*=\s*false\b", "reuse_port = true", text)
        if not n:
            text, n = re.subn(r"(?m)^\[listen\]\s*$", "[listen]\nreuse_port = true", text, count=1)
        if not n:
            raise RuntimeError("service.toml: cannot set [listen] reuse_port")
    if radius is not None:
        if "radius" in tomllib.loads(text):
            raise RuntimeError("service.toml already has a [radius] table: the bench cannot add its own")
        text += (f'\n[radius]\nauth = "127.0.0.1:{radius[0]}"\nacct = "127.0.0.1:{radius[1]}"\n'
                 f'clients = [{{ address = "127.0.0.1", secret = "{RADIUS_SECRET}", style = "avp", '
                 'name = "bench" }]\n')
    tomllib.loads(text)
    path = work / "service.toml"
    path.write_text(text)
    return path


class Bench:
    """Everything one `make bench` run starts, measures and reports."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.top = Path(tempfile.mkdtemp(prefix="cpbench-"))
        self.procs: list[Proc] = []
        self.redis: RedisServer | None = None
        self.cluster: Any = None  # tests.cluster.RedisClusterNodes of the cluster section
        self.scen: dict[str, dict[str, Any]] = {}
        self.notes: list[str] = []
        self.tags = itertools.count(1)
        cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        self.cpus = cpus
        self.pinned = bool(args.pin and len(cpus) >= 2)
        self.baseline: Proc | None = None
        self.servers: dict[str, Any] = {}
        self.background: dict[str, Any] = {}
        self.versions: dict[str, str] = {}

    # -- processes

    def start_baseline(self) -> Proc:
        work = self.top / "baseline"
        work.mkdir()
        for _ in range(3):
            port = free_port()
            unix = str(work / "baseline.sock")
            log = work / "baseline.log"
            fh = open(log, "ab")  # noqa: SIM115
            popen = subprocess.Popen([sys.executable, str(BENCH / "baseline.py"), "--tcp", f"127.0.0.1:{port}",
                                      "--udp", f"127.0.0.1:{port}", "--unix", unix],
                                     stdout=fh, stderr=subprocess.STDOUT, cwd=str(work))
            fh.close()
            proc = Proc("baseline", popen, work, log, port=port, unix=unix)
            self.procs.append(proc)
            try:
                _wait_ready(proc, port, 15)
            except RuntimeError as exc:
                proc.stop()
                if "address already in use" in str(exc).lower():
                    continue
                raise
            self._pin_server(proc.pid)
            return proc
        raise RuntimeError("baseline: no free port after 3 tries")

    def start_service(self, name: str, *, store: str | None = None, port: int | None = None,
                      reuse_port: bool = False, radius: bool = False) -> Proc:
        """`callpolicy serve` on the shipped settings in its own directory; retried on a port race."""
        work = self.top / name
        work.mkdir()
        for _ in range(3):
            p = port or free_port()
            rad = (free_port(), free_port()) if radius else None
            cfg = service_config(work, reuse_port=reuse_port, radius=rad)
            unix = str(work / "run" / "callpolicy.sock")
            argv = [*callpolicy_argv(), "--config", str(cfg), "serve", "--rules", str(ROOT / "rules"),
                    "--tcp", f"127.0.0.1:{p}", "--udp", f"127.0.0.1:{p}", "--unix", unix, "--metrics", "none"]
            if store:
                argv += ["--store", store]
            log = work / "serve.log"
            fh = open(log, "ab")  # noqa: SIM115
            popen = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, cwd=str(work))
            fh.close()
            proc = Proc(name, popen, work, log, port=p, unix=unix, radius=rad, argv=argv, config=str(cfg))
            self.procs.append(proc)
            self.servers[name] = {"argv": argv, "config_changes": {"reuse_port": reuse_port, "radius": radius}}
            try:
                _wait_ready(proc, p)
            except RuntimeError as exc:
                proc.stop()
                if port is None and "in use" in str(exc).lower():
                    continue
                raise
            self._pin_server(proc.pid)
            return proc
        raise RuntimeError(f"{name}: no free port after 3 tries")

    def snapshotted(self, svc: Proc, fn: Callable[[], dict[str, Any]]) -> Callable[[], dict[str, Any]]:
        """fn, plus the service's loop figures over the run (bench/lag.py) and whether it
        compacted its journal into the snapshot while fn ran (stats `compactions`; else the
        snapshot file's mtime: the compaction renames a new file over it)."""
        path = svc.workdir / "run" / "snapshot.json"
        observed = self.observed([svc], fn)

        def run() -> dict[str, Any]:
            t0 = time.time()
            r = observed()
            if "snapshot_in_run" not in r:
                with contextlib.suppress(OSError):
                    r["snapshot_in_run"] = path.stat().st_mtime >= t0
            r.setdefault("snapshot_in_run", False)
            return r

        return run

    def observed(self, svcs: list[Proc], fn: Callable[[], dict[str, Any]]) -> Callable[[], dict[str, Any]]:
        """fn, plus r["loop"]: the services' loop-lag figures over the run (bench/lag.py)."""
        from lag import observe

        return observe([p.info["unix"] for p in svcs], fn)

    def stop(self, proc: Proc) -> None:
        proc.stop()
        if proc in self.procs:
            self.procs.remove(proc)

    def _pin_server(self, pid: int) -> None:
        if self.pinned:
            os.sched_setaffinity(pid, {self.cpus[-1]})

    def _pin_other(self) -> None:  # runs in the child (preexec_fn)
        os.sched_setaffinity(0, set(self.cpus[:-1]))

    def cleanup(self) -> None:
        for proc in reversed(self.procs):
            with contextlib.suppress(Exception):
                proc.stop()
        self.procs.clear()
        if self.redis is not None:
            with contextlib.suppress(Exception):
                self.redis.stop()
            shutil.rmtree(self.redis.dir, ignore_errors=True)
            self.redis = None
        if self.cluster is not None:
            with contextlib.suppress(Exception):
                self.cluster.stop()
            self.cluster = None
        if self.args.keep:
            print(f"kept: {self.top}")
        else:
            shutil.rmtree(self.top, ignore_errors=True)

    # -- the load generator

    def tag(self) -> str:
        return f"b{os.getpid() % 10000}r{next(self.tags)}"

    def loadgen(self, argv: list[str], timeout: float) -> dict[str, Any]:
        """Run loadgen.py in its own process; its JSON result."""
        out = subprocess.run([sys.executable, str(BENCH / "loadgen.py"), *argv], capture_output=True,
                             timeout=timeout, preexec_fn=self._pin_other if self.pinned else None)
        if out.returncode != 0:
            raise RuntimeError(f"loadgen {' '.join(argv)} failed ({out.returncode}):\n"
                               f"{out.stderr.decode(errors='replace')[-3000:]}")
        result: dict[str, Any] = orjson.loads(out.stdout.strip().splitlines()[-1])
        return result

    def closed(self, target: list[str], pids: list[int], *, conns: int | None = None, depth: int | None = None,
               ops: str = "check,end", calls: int | None = None, tag: str | None = None,
               template: str = "bench") -> dict[str, Any]:
        a = self.args
        argv = ["closed", *target, "--conns", str(conns or a.conns), "--depth", str(depth or a.depth),
                "--ops", ops, "--tag", tag or self.tag(), "--template", template]
        if calls is not None:
            argv += ["--calls", str(calls), "--warmup", "0"]
            timeout = 600.0
        else:
            argv += ["--seconds", str(a.seconds), "--warmup", str(a.warmup)]
            timeout = a.seconds + a.warmup + 120
        for p in pids:
            argv += ["--pid", str(p)]
        return self.loadgen(argv, timeout)

    def open(self, target: list[str], pids: list[int], rate: float) -> dict[str, Any]:
        a = self.args
        argv = ["open", *target, "--rate", str(rate), "--seconds", str(a.open_seconds), "--warmup", str(a.warmup),
                "--conns", str(a.open_conns), "--hold", str(a.hold), "--tag", self.tag()]
        for p in pids:
            argv += ["--pid", str(p)]
        return self.loadgen(argv, a.open_seconds + a.warmup + a.hold + 120)

    def hold_background(self, name: str, target: list[str], pids: list[int], depth: int = 256) -> dict[str, Any]:
        """The background of held calls: check then answer, `--held` calls. Calls that failed
        (printed) are replaced by new ones, up to three passes; then all must be held."""
        n = self.args.held
        held = 0
        t0 = time.perf_counter()
        errors: Counter[str] = Counter()
        for _ in range(3):
            if held >= n:
                break
            r = self.closed(target, pids, conns=8, depth=depth, ops="check,answer", calls=n - held,
                            template="held", tag=f"held{next(self.tags)}")
            held += r["completed_all"]
            errors.update(r["errors"])
        took = time.perf_counter() - t0
        print(f"  {name}: {held:,} held calls in {took:.1f} s"
              + (f"  (failed and replaced: {dict(errors)})" if errors else ""), flush=True)
        if held < n:
            raise RuntimeError(f"{name}: only {held} of {n} background calls are held: {dict(errors)}")
        self.background[name] = {"held": held, "replaced_errors": dict(errors), "seconds": round(took, 1)}
        return self.background[name]

    # -- scenarios

    def scenario(self, key: str, label: str, kind: str, **info: Any) -> dict[str, Any]:
        s = self.scen.setdefault(key, {"key": key, "label": label, "kind": kind, "runs": [], **info})
        return s

    def measure(self, key: str, label: str, kind: str, fn: Callable[[], dict[str, Any]],
                baseline: tuple[str, str, Callable[[], dict[str, Any]]] | None = None, **info: Any) -> None:
        """`--runs` runs of fn, each after a run of the baseline scenario (if it still needs runs)."""
        items: list[tuple[str, str, str, Callable[[], dict[str, Any]], dict[str, Any]]] = []
        if baseline is not None:
            items.append((baseline[0], baseline[1], kind, baseline[2], {}))
            info["baseline"] = baseline[0]
        items.append((key, label, kind, fn, info))
        self.rounds(items)

    def rounds(self, items: list[tuple[str, str, str, Callable[[], dict[str, Any]], dict[str, Any]]]) -> None:
        """Interleave scenarios: round i runs each one that has fewer than i+1 runs, in order, so
        figures compared with each other saw the same moments of a noisy machine."""
        scen = [self.scenario(key, label, kind, **info) for key, label, kind, _, info in items]
        for i in range(self.args.runs):
            for s, item in zip(scen, items, strict=True):
                if len(s["runs"]) <= i:
                    r = item[3]()
                    s["runs"].append(r)
                    self._progress(s, r, i)

    def _progress(self, s: dict[str, Any], r: dict[str, Any], i: int) -> None:
        lat = r.get("latency", {}).get("check", {})
        cpu = r.get("cpu", {})
        svc = " ".join(f"{v:.0%}" for v in cpu.get("service_core", {}).values())
        bad = f"  !! errors {r['error_count']} {r['errors']}" if r["error_count"] else ""
        bad += f"  !! lost {r['lost']}" if r["lost"] else ""
        p99 = f"  check p99 {_ms(lat.get('p99'))} ms (from schedule)" if r.get("mode") == "open" else ""
        snap = ""
        if "snapshot_in_run" in r:
            snap = "  snapshot in run" if r["snapshot_in_run"] else "  NO snapshot in run"
        lp = r.get("loop")
        if lp and lp.get("available"):
            snap += (f"  loop max {_ms(lp['max_ms'])} ms busy {_ms(lp['busy_max_ms'])} ms "
                     f"stalls {lp['stalls']}")
        print(f"  {s['label']:<44} run {i + 1}: {r['rate']:>9,.0f}/s{p99}  "
              f"CPU gen {cpu.get('generator_core', 0):.0%} servers {svc or '-'} "
              f"others {cpu.get('other_cores', 0):.0%}{snap}{bad}", flush=True)

    # -- sections

    def baseline_target(self, kind: str) -> tuple[list[str], list[int]]:
        assert self.baseline is not None
        b = self.baseline
        t = {"tcp": ["--tcp", f"127.0.0.1:{b.info['port']}"], "unix": ["--unix", b.info["unix"]],
             "udp": ["--udp", f"127.0.0.1:{b.info['port']}"]}[kind]
        return t, [b.pid]

    def base_closed(self, kind: str) -> tuple[str, str, Callable[[], dict[str, Any]]]:
        t, pids = self.baseline_target(kind)
        a = self.args
        if kind == "udp":
            label = f"baseline UDP {a.conns}x{a.udp_window}"
            return (f"baseline_{kind}", label, lambda: self.closed(t, pids, depth=a.udp_window))
        label = f"baseline {kind.upper() if kind == 'tcp' else 'Unix'} {a.conns}x{a.depth} pipelined"
        return (f"baseline_{kind}", label, lambda: self.closed(t, pids))

    def base_open(self, rate: float) -> tuple[str, str, Callable[[], dict[str, Any]]]:
        t, pids = self.baseline_target("tcp")
        return (f"baseline_open{rate:.0f}", f"baseline TCP open loop @ {rate:,.0f}/s",
                lambda: self.open(t, pids, rate))

    def section_embedded(self) -> None:
        a = self.args
        print("\n== embedded store ==", flush=True)
        svc = self.start_service("embedded")
        try:
            tcp = ["--tcp", f"127.0.0.1:{svc.info['port']}"]
            self.hold_background("embedded", tcp, [svc.pid])
            pids = [svc.pid]
            snap = self.snapshotted
            self.measure("embedded_tcp", f"embedded TCP {a.conns}x{a.depth} pipelined", "closed",
                         snap(svc, lambda: self.closed(tcp, pids)), self.base_closed("tcp"))
            unix = ["--unix", svc.info["unix"]]
            self.measure("embedded_unix", f"embedded Unix {a.conns}x{a.depth} pipelined", "closed",
                         snap(svc, lambda: self.closed(unix, pids)), self.base_closed("unix"))
            udp = ["--udp", f"127.0.0.1:{svc.info['port']}"]
            self.measure("embedded_udp", f"embedded UDP {a.conns}x{a.udp_window}", "closed",
                         snap(svc, lambda: self.closed(udp, pids, depth=a.udp_window)), self.base_closed("udp"))
            for rate in a.rates_embedded:
                self.measure(f"embedded_open{rate:.0f}", f"embedded TCP open loop @ {rate:,.0f}/s", "open",
                             snap(svc, lambda rate=rate: self.open(tcp, pids, rate)), self.base_open(rate))
        finally:
            self.stop(svc)

    def section_redis(self) -> None:
        from bench_redis import run_redis_benchmark, script_delta, script_stats, server_version

        a = self.args
        print("\n== Redis store ==", flush=True)
        if shutil.which("redis-server") is None:
            raise RuntimeError("redis-server is not installed")
        self.redis = redis = RedisServer().start()
        assert redis.proc is not None
        if self.pinned:
            os.sched_setaffinity(redis.proc.pid, set(self.cpus[:-1]))
        self.versions["redis-server"] = server_version(redis.port)
        self.notes.append(f"redis-server {self.versions['redis-server']} (no persistence), private, port {redis.port}")
        rpid = redis.proc.pid
        if a.redis_benchmark:
            try:
                rb = run_redis_benchmark(redis.port)
                self.scenario("redis_benchmark", "redis-benchmark EVALSHA reserve.lua", "info")["result"] = rb
                print(f"  redis-benchmark EVALSHA reserve.lua: {rb['requests_per_s']:,.0f}/s, "
                      f"Redis {rb['usec_per_call']:.1f} us/call", flush=True)
            except Exception as exc:  # uses store internals: say why it did not run
                self.notes.append(f"redis-benchmark skipped: {exc!r}")
        svc = self.start_service("redis1", store=redis.url)
        procs = [svc]
        try:
            tcp = ["--tcp", f"127.0.0.1:{svc.info['port']}"]
            pids = [svc.pid, rpid]
            # gently: 8 x 256 outstanding would queue past the store's 50 ms timeout
            self.hold_background("redis", tcp, pids, depth=16)
            # two more on one shared port, up (idle) during the one-process runs, so the
            # one- and two-process runs can be interleaved; only where the cores allow (two
            # services + Redis + the generator): on fewer, two processes only overload the machine
            # (Redis answers past store.timeout and checks get store errors), which says nothing
            # about scaling
            cores = len(os.sched_getaffinity(0))
            two_procs = cores >= TWO_PROCESS_CORES or a.two_processes
            if not two_procs:
                self.scenario("redis_tcp_2proc_skipped", "Redis, 2 processes 1 port", "info")["result"] = {
                    "cores": cores, "needs": TWO_PROCESS_CORES}
                print(f"  Redis, 2 processes 1 port: not run, {cores} cores for 2 services + Redis + the "
                      f"generator (needs >= {TWO_PROCESS_CORES}; --two-processes runs it anyway)", flush=True)
            else:
                port2 = free_port()
                s2a = self.start_service("redis2a", store=redis.url, port=port2, reuse_port=True)
                procs.append(s2a)
                s2b = self.start_service("redis2b", store=redis.url, port=port2, reuse_port=True)
                procs.append(s2b)
                tcp2 = ["--tcp", f"127.0.0.1:{port2}"]
                pids2 = [s2a.pid, s2b.pid, rpid]

            def closed_with_redis_time(target: list[str], ps: list[int]) -> dict[str, Any]:
                before = script_stats(redis.port)
                r = self.closed(target, ps)
                calls, usec = script_delta(before, script_stats(redis.port))
                r["redis_scripts"] = {"calls": calls, "usec": usec, "usec_per_call": usec / calls if calls else None}
                return r

            def two() -> dict[str, Any]:
                acc0 = [_accepted(p) for p in (s2a, s2b)]
                r = closed_with_redis_time(tcp2, pids2)
                acc1 = [_accepted(p) for p in (s2a, s2b)]
                # each stats query is a connection too: the first one is before, the second after
                r["connections_per_process"] = [y - x - 1 for x, y in zip(acc0, acc1, strict=True)]
                return r

            base = self.base_closed("tcp")
            rounds = [(base[0], base[1], "closed", base[2], {}),
                      ("redis_tcp", f"Redis, 1 process, TCP {a.conns}x{a.depth}", "closed",
                       self.observed([svc], lambda: closed_with_redis_time(tcp, pids)), {"baseline": base[0]})]
            if two_procs:
                rounds.append(("redis_tcp_2proc", f"Redis, 2 processes 1 port, TCP {a.conns}x{a.depth}", "closed",
                               self.observed([s2a, s2b], two), {"baseline": base[0]}))
            self.rounds(rounds)
            for rate in a.rates_redis:
                self.measure(f"redis_open{rate:.0f}", f"Redis, 1 process, open loop @ {rate:,.0f}/s", "open",
                             self.observed([svc], lambda rate=rate: self.open(tcp, pids, rate)),
                             self.base_open(rate))

            def phases() -> dict[str, Any]:
                tag = self.tag()
                out: dict[str, Any] = {}
                for op in ("check", "end"):
                    before = script_stats(redis.port)
                    r = self.closed(tcp, pids, ops=op, calls=a.phase_calls, tag=tag)
                    calls, usec = script_delta(before, script_stats(redis.port))
                    done = r["completed_all"]
                    out[op] = {"calls": calls, "usec": usec, "requests": done, "other_calls": calls - done,
                               "usec_per_call": usec / calls if calls else None, "errors": r["errors"],
                               "error_count": r["error_count"], "lost": r["lost"], "rate": r["rate"]}
                res = {"mode": "phases", "phases": out, "error_count": sum(p["error_count"] for p in out.values()),
                       "errors": dict(sum((Counter(p["errors"]) for p in out.values()), Counter())),
                       "lost": sum(p["lost"] for p in out.values()),
                       "rate": out["check"]["rate"], "reserve_usec": out["check"]["usec_per_call"],
                       "end_usec": out["end"]["usec_per_call"]}
                print(f"  {'Redis time per script':<44} reserve {_us(res['reserve_usec'])} us, "
                      f"end {_us(res['end_usec'])} us ({out['check']['requests']:,} calls; "
                      f"{out['check']['other_calls'] + out['end']['other_calls']} sweep/stats scripts mixed in)"
                      + (f"  !! errors {res['errors']}" if res["error_count"] else ""), flush=True)
                return res

            s = self.scenario("redis_scripts", "Redis time per script (INFO commandstats)", "scripts")
            for _ in range(a.runs):
                s["runs"].append(phases())
            if a.outage_seconds > 0:  # last: Redis is killed and replaced by an empty one
                from faults import run_outages

                for p in procs[1:]:  # the idle two-process pair would only add reconnect noise
                    self.stop(p)
                del procs[1:]
                run_outages(self, redis, svc)
        finally:
            for p in reversed(procs):
                self.stop(p)
            redis.stop()
            self.redis = None
            shutil.rmtree(redis.dir, ignore_errors=True)

    def section_outages(self) -> None:
        """Redis outage phases on their own service (`--only outages`); with the Redis section
        chosen too they run at its end, on its service."""
        if "redis" in self.args.sections or self.args.outage_seconds <= 0:
            return
        from faults import section

        section(self)
    def section_cluster(self) -> None:
        """The Redis Cluster store (bench_cluster.py): pairs/s and Redis time per check on every
        primary, the spread of the load, next to the single-Redis store in the same rounds."""
        from bench_cluster import client_cost, per_node, stats_of
        from bench_redis import server_version

        from tests.cluster import RedisClusterNodes

        a = self.args
        print("\n== Redis Cluster store ==", flush=True)
        if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
            raise RuntimeError("redis-server and redis-cli are needed")
        self.cluster = cluster = RedisClusterNodes(primaries=a.cluster_primaries, replicas=a.cluster_replicas).start()
        single = RedisServer().start()
        procs: list[Proc] = []
        try:
            ports = cluster.primaries()
            rpids = [cluster.procs[p].pid for p in cluster.ports]
            spid = single.proc.pid if single.proc else 0
            self.versions["redis-server"] = server_version(ports[0])
            self.notes.append(f"Redis Cluster: {len(ports)} primaries, {a.cluster_replicas} replica(s) each, "
                              f"ports {cluster.ports}; single redis-server on port {single.port} in the same rounds")
            if a.client_cost:
                cc = client_cost(cluster.url, n=a.client_cost_commands)
                self.scenario("cluster_client_cost", "client CPU per EVALSHA on the cluster", "info")["result"] = cc
                rp, pp = cc["redis_py_cluster_us"]["cpu"], cc["redis_py_cluster_pipeline_us"]["cpu"]
                print(f"  client CPU per command, {cc['concurrent']} concurrent: redis-py RedisCluster {rp:.1f} us "
                      f"(pipeline {pp:.1f}, one at a time {cc['redis_py_cluster_one_at_a_time_us']['cpu']:.1f}), "
                      f"the store's pipes {cc['store_pipes_us']['cpu']:.1f} us ({cc['cpu_ratio']:.1f}x)", flush=True)
            svc = self.start_service("cluster1", store=cluster.url)
            procs.append(svc)
            one = self.start_service("cluster_single", store=single.url)
            procs.append(one)
            tcp = ["--tcp", f"127.0.0.1:{svc.info['port']}"]
            tcp1 = ["--tcp", f"127.0.0.1:{one.info['port']}"]
            pids = [svc.pid, *rpids]
            pids1 = [one.pid, spid]
            self.hold_background("cluster", tcp, pids, depth=16)
            self.hold_background("cluster-single", tcp1, pids1, depth=16)

            def closed_nodes(target: list[str], ps: list[int], nodes: list[int]) -> dict[str, Any]:
                before = stats_of(nodes)
                r = self.closed(target, ps)
                r["redis_nodes"] = per_node(before, stats_of(nodes), r["sent"]["check"])
                _print_nodes(r["redis_nodes"])
                return r

            base = self.base_closed("tcp")
            self.rounds([(base[0], base[1], "closed", base[2], {}),
                         ("cluster_tcp", f"Redis Cluster ({len(ports)} primaries), TCP {a.conns}x{a.depth}",
                          "closed", lambda: closed_nodes(tcp, pids, ports), {"baseline": base[0]}),
                         ("cluster_single_tcp", f"single Redis, same rounds, TCP {a.conns}x{a.depth}", "closed",
                          lambda: closed_nodes(tcp1, pids1, [single.port]), {"baseline": base[0]})])
            for rate in a.rates_cluster:
                self.measure(f"cluster_open{rate:.0f}", f"Redis Cluster, open loop @ {rate:,.0f}/s", "open",
                             lambda rate=rate: self.open(tcp, pids, rate), self.base_open(rate))

            def phases() -> dict[str, Any]:
                tag = self.tag()
                out: dict[str, Any] = {}
                for op in ("check", "end"):
                    before = stats_of(ports)
                    r = self.closed(tcp, pids, ops=op, calls=a.phase_calls, tag=tag)
                    out[op] = per_node(before, stats_of(ports), r["sent"][op])
                    out[op].update(errors=r["errors"], error_count=r["error_count"], lost=r["lost"], rate=r["rate"])
                res = {"mode": "phases", "phases": out, "error_count": sum(p["error_count"] for p in out.values()),
                       "errors": dict(sum((Counter(p["errors"]) for p in out.values()), Counter())),
                       "lost": sum(p["lost"] for p in out.values()), "rate": out["check"]["rate"],
                       "reserve_usec": out["check"]["scripts_usec_per_check"],
                       "end_usec": out["end"]["scripts_usec_per_check"]}
                print(f"  {'Redis time per op, all primaries (scripts)':<44} check {_us(res['reserve_usec'])} us, "
                      f"end {_us(res['end_usec'])} us; CPU check "
                      f"{_us(out['check']['cpu_usec_per_check'])} us, end {_us(out['end']['cpu_usec_per_check'])} us"
                      + (f"  !! errors {res['errors']}" if res["error_count"] else ""), flush=True)
                return res

            s = self.scenario("cluster_scripts", "Redis Cluster time per check and per end", "scripts")
            for _ in range(a.runs):
                s["runs"].append(phases())
        finally:
            for p in reversed(procs):
                self.stop(p)
            single.stop()
            shutil.rmtree(single.dir, ignore_errors=True)
            cluster.stop()
            self.cluster = None

    def section_radius(self) -> None:
        a = self.args
        print("\n== RADIUS ==", flush=True)
        svc = self.start_service("radius", radius=True)
        try:
            tcp = ["--tcp", f"127.0.0.1:{svc.info['port']}"]
            self.hold_background("radius", tcp, [svc.pid])
            auth_port, acct_port = svc.info["radius"]

            def run() -> dict[str, Any]:
                argv = ["radius", "--auth", f"127.0.0.1:{auth_port}", "--acct", f"127.0.0.1:{acct_port}",
                        "--secret", RADIUS_SECRET, "--window", str(a.radius_window), "--seconds", str(a.seconds),
                        "--warmup", str(a.warmup), "--tag", self.tag(), "--pid", str(svc.pid)]
                return self.loadgen(argv, a.seconds + a.warmup + 120)

            self.measure("radius", f"RADIUS Access-Req + Acct-Stop, window {a.radius_window}", "closed",
                         self.snapshotted(svc, run), self.base_closed("udp"))
        finally:
            self.stop(svc)


def _print_nodes(r: dict[str, Any]) -> None:
    """One line per Redis: usec per check (scripts, whole CPU), share of commands and CPU."""
    for port, n in r["nodes"].items():
        print(f"      redis {port}: scripts {_us(n['scripts_usec_per_check'])} us/check, CPU "
              f"{_us(n['cpu_usec_per_check'])} us/check, {n['commands_share']:.0%} of the commands, "
              f"{n['cpu_share']:.0%} of the Redis CPU", flush=True)


def _accepted(proc: Proc) -> int:
    c = LineClient(unix=proc.info["unix"], timeout=5.0)
    try:
        return int(c.call("stats")["connections"]["accepted"])
    finally:
        c.close()


# -- summary -----------------------------------------------------------------------------------

def _ms(v: Any) -> str:
    if v is None:
        return "lost"
    if isinstance(v, float) and math.isnan(v):
        return "-"
    return f"{v:.2f}" if v < 10 else f"{v:.1f}" if v < 100 else f"{v:.0f}"


def _us(v: Any) -> str:
    return "-" if v is None else f"{v:.1f}"


def _stat(values: list[float | None]) -> dict[str, Any]:
    """median/min/max of run values; a None (a lost percentile) sorts above everything."""
    if not values:
        return {"median": None, "min": None, "max": None, "values": []}
    inf = [math.inf if v is None else v for v in values]
    med = statistics.median_low(inf) if len(inf) % 2 == 0 else statistics.median(inf)

    def back(v: float) -> float | None:
        return None if math.isinf(v) else v

    return {"median": back(med), "min": back(min(inf)), "max": back(max(inf)), "values": values}


def summarize(b: Bench) -> dict[str, Any]:
    """Medians, ranges, ratios, errors of every scenario."""
    out: dict[str, Any] = {}
    for key, s in b.scen.items():
        runs = s["runs"]
        sm: dict[str, Any] = {k: v for k, v in s.items() if k != "runs"}
        if s["kind"] in ("info", "outages"):
            if s["kind"] == "outages":
                sm["runs"] = runs
            out[key] = sm
            continue
        errs: Counter[str] = Counter()
        for r in runs:
            errs.update(r.get("errors", {}))
        sm["errors"] = dict(errs.most_common())
        sm["error_count"] = sum(errs.values())
        sm["lost"] = sum(r.get("lost", 0) for r in runs)
        sm["rate"] = _stat([r["rate"] for r in runs])
        if s["kind"] == "scripts":
            sm["reserve_usec"] = _stat([r["reserve_usec"] for r in runs])
            sm["end_usec"] = _stat([r["end_usec"] for r in runs])
        else:
            sm["latency"] = {op: {p: _stat([r["latency"][op][p] for r in runs]) for p in ("p50", "p99", "p999", "max")}
                             for op in runs[0]["latency"]} if runs else {}
            sm["generator_core"] = _stat([r["cpu"].get("generator_core") for r in runs])
            sm["service_core"] = _stat([sum(v for k, v in r["cpu"].get("service_core", {}).items()) for r in runs])
            sm["machine_busy"] = _stat([r["cpu"].get("machine_busy") for r in runs])
            sm["other_cores"] = _stat([r["cpu"].get("other_cores") for r in runs])
            if s["kind"] == "open":  # how late the generator itself sent the checks
                sm["send_lag_p99"] = _stat([r["send_lag"]["p99"] for r in runs])
        loop = summarize_loop(runs)
        if loop is not None:
            sm["loop"] = loop
        if key == "redis_tcp":
            sm["redis_usec_per_evalsha"] = _stat([r["redis_scripts"]["usec_per_call"] for r in runs])
        if runs and "redis_nodes" in runs[0]:
            sm["redis_nodes"] = _nodes_summary([r["redis_nodes"] for r in runs])
        if runs and s["kind"] == "scripts" and "phases" in runs[0] and "nodes" in runs[0]["phases"]["check"]:
            sm["redis_nodes"] = {op: _nodes_summary([r["phases"][op] for r in runs]) for op in ("check", "end")}
        if key == "redis_tcp_2proc":
            sm["connections_per_process"] = [r.get("connections_per_process") for r in runs]
        sm["runs"] = runs
        out[key] = sm
    for sm in out.values():
        base = out.get(sm.get("baseline", ""))
        if not base or sm["kind"] == "info":
            continue
        if sm["kind"] == "closed":
            bm = base["rate"]["median"]
            sm["ratio"] = sm["rate"]["median"] / bm if bm else None
            pairs = list(zip(sm["rate"]["values"], base["rate"]["values"], strict=False))
            rr = [x / y for x, y in pairs if y]
            sm["ratio_runs"] = {"min": min(rr), "max": max(rr)} if rr else None
            sm["ratio_to"] = base["label"]
        elif sm["kind"] == "open":
            sv, bv = sm["latency"]["check"]["p99"]["median"], base["latency"]["check"]["p99"]["median"]
            sm["p99_vs_baseline"] = (math.inf if sv is None else sv / bv) if bv else None
            sm["ratio_to"] = base["label"]
    if "redis_tcp_2proc" in out and "redis_tcp" in out and out["redis_tcp"]["rate"]["median"]:
        two, one = out["redis_tcp_2proc"], out["redis_tcp"]
        two["vs_one_process"] = two["rate"]["median"] / one["rate"]["median"]
        rr = [x / y for x, y in zip(two["rate"]["values"], one["rate"]["values"], strict=False) if y]
        two["vs_one_process_runs"] = {"min": min(rr), "max": max(rr)} if rr else None
        two["redis_usec_per_evalsha"] = _stat([r["redis_scripts"]["usec_per_call"] for r in two["runs"]])
    return out


def _nodes_summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over runs of per_node() results (bench_cluster.py)."""
    out: dict[str, Any] = {k: _stat([r[k] for r in runs])
                           for k in ("scripts_usec_per_check", "cpu_usec_per_check", "commands_per_check")}
    out["nodes"] = {port: {k: _stat([r["nodes"][port][k] for r in runs])
                           for k in ("scripts_usec_per_check", "cpu_usec_per_check", "commands_share", "cpu_share")}
                    for port in runs[0]["nodes"]}
    return out


def _range(st: dict[str, Any], fmt: Callable[[Any], str]) -> str:
    return f"{fmt(st['median'])} [{fmt(st['min'])}-{fmt(st['max'])}]"


def _int(v: Any) -> str:
    return "-" if v is None else f"{v:,.0f}"


def _pct(v: Any) -> str:
    return "-" if v is None else f"{v:.1%}" if v < 0.1 else f"{v:.0%}"


def report(b: Bench, out: dict[str, Any], machine: dict[str, Any], settings: dict[str, Any]) -> list[str]:
    """The printed tables; returns the list of problems (errors, lost replies)."""
    a = b.args
    problems: list[str] = []
    print()
    print("=" * 118)
    pin = f"PINNED (servers on CPU {b.cpus[-1]}, the rest on the others)" if b.pinned else "unpinned"
    print(f"callpolicy bench: {machine['cores']} cores ({machine['cpu']}), Python {machine['python']}, {pin}, "
          f"{settings['held']:,} held calls, snapshots every {settings['snapshot_interval']} s, "
          f"{a.runs} runs x {a.seconds} s (+{a.warmup} s warm-up)")
    if a.quick:
        print("QUICK MODE: short runs, few held calls, no snapshot inside a run - not representative")
    print("Every reply parsed and checked; a pair = check allowed + end released. "
          "Figures: median [min-max] of the runs.")
    closed = [s for s in out.values() if s["kind"] == "closed"]
    if closed:
        print()
        print(f"{'closed loop':<46} {'pairs/s (calls/s)':<28} {'vs baseline':<22} "
              f"{'errors':>6} {'lost':>5}  CPU gen/servers/others")
        for s in closed:
            ratio = ("-" if "ratio" not in s or s["ratio"] is None else
                     f"{_pct(s['ratio'])} [{_pct(s['ratio_runs']['min'])}-{_pct(s['ratio_runs']['max'])}]")
            if s["key"].startswith("baseline"):
                ratio = "(the baseline)"
            flag = ""
            if (s["generator_core"]["median"] or 0) >= 0.9:
                flag = "  << generator-bound"
            print(f"{s['label']:<46} {_range(s['rate'], _int):<28} {ratio:<22} {s['error_count']:>6} {s['lost']:>5}  "
                  f"{_pct(s['generator_core']['median'])}/{_pct(s['service_core']['median'])}/"
                  f"{_pct(s['other_cores']['median'])}{flag}")
    opened = [s for s in out.values() if s["kind"] == "open"]
    if opened:
        print()
        print("open loop: check latency in ms from the SCHEDULED send (lost replies count as infinite)")
        print(f"{'':<46} {'achieved/s':>10} {'p50':>6} {'p99 [min-max]':>20} {'p99.9':>7} {'max':>7} "
              f"{'errors':>6} {'lost':>5}  {'p99 vs baseline':<15} gen late p99, others")
        for s in opened:
            lat = s["latency"]["check"]
            vs = s.get("p99_vs_baseline")
            vs_s = "-" if vs is None else ("inf" if math.isinf(vs) else f"{vs:.1f}x")
            if s["key"].startswith("baseline"):
                vs_s = "(the baseline)"
            print(f"{s['label']:<46} {_int(s['rate']['median']):>10} {_ms(lat['p50']['median']):>6} "
                  f"{_range(lat['p99'], _ms):>20} {_ms(lat['p999']['median']):>7} {_ms(lat['max']['median']):>7} "
                  f"{s['error_count']:>6} {s['lost']:>5}  {vs_s:<15} {_ms(s['send_lag_p99']['median'])} ms, "
                  f"{_pct(s['other_cores']['median'])}")
    if "redis_scripts" in out or "redis_tcp" in out:
        print()
        print("Redis time per script (INFO commandstats, cmdstat_evalsha usec/calls)")
        if "redis_scripts" in out:
            s = out["redis_scripts"]
            print(f"  reserve (checks-only phase): {_range(s['reserve_usec'], _us)} us   "
                  f"end (ends-only phase): {_range(s['end_usec'], _us)} us   "
                  f"errors {s['error_count']}, lost {s['lost']}")
        if "redis_tcp" in out:
            print(f"  mixed, during the closed loop (reserve and end averaged): "
                  f"{_range(out['redis_tcp']['redis_usec_per_evalsha'], _us)} us")
        if "redis_benchmark" in out:
            rb = out["redis_benchmark"]["result"]
            print(f"  redis-benchmark EVALSHA reserve.lua: {rb['requests_per_s']:,.0f}/s "
                  f"({rb['usec_per_call']:.1f} us/call in Redis)")
    if "cluster_tcp" in out or "cluster_scripts" in out:
        print()
        print("Redis Cluster: Redis time per check+end pair by Redis server (closed loop) - scripts: INFO "
              "commandstats EVALSHA usec; CPU: used_cpu_sys+user, sockets included")
        for key in ("cluster_tcp", "cluster_single_tcp"):
            if key not in out or "redis_nodes" not in out[key]:
                continue
            rn = out[key]["redis_nodes"]
            print(f"  {out[key]['label']}: scripts {_range(rn['scripts_usec_per_check'], _us)} us, CPU "
                  f"{_range(rn['cpu_usec_per_check'], _us)} us, {_us(rn['commands_per_check']['median'])} "
                  f"commands per pair")
            for port, n in rn["nodes"].items():
                print(f"    redis {port}: scripts {_us(n['scripts_usec_per_check']['median'])} us, CPU "
                      f"{_us(n['cpu_usec_per_check']['median'])} us, {_pct(n['commands_share']['median'])} of "
                      f"the commands, {_pct(n['cpu_share']['median'])} of the CPU")
        if "cluster_scripts" in out and "redis_nodes" in out["cluster_scripts"]:
            for op in ("check", "end"):
                rn = out["cluster_scripts"]["redis_nodes"][op]
                per = ", ".join(f"{port} {_us(n['scripts_usec_per_check']['median'])}"
                                for port, n in rn["nodes"].items())
                print(f"  {op}s only: scripts {_range(rn['scripts_usec_per_check'], _us)} us per {op} "
                      f"(by primary: {per}), CPU {_range(rn['cpu_usec_per_check'], _us)} us")
        if "cluster_client_cost" in out:
            cc = out["cluster_client_cost"]["result"]
            print(f"  client CPU per command: redis-py RedisCluster {cc['redis_py_cluster_us']['cpu']:.1f} us, "
                  f"its pipeline {cc['redis_py_cluster_pipeline_us']['cpu']:.1f} us, the store's pipes "
                  f"{cc['store_pipes_us']['cpu']:.1f} us")
    if "redis_tcp_2proc_skipped" in out:
        sk = out["redis_tcp_2proc_skipped"]["result"]
        print(f"\ntwo processes on one port: not run - {sk['cores']} cores for 2 services + Redis + the generator; "
              f"1.5x one process needs >= {sk['needs']} cores (--two-processes runs it anyway)")
    if "redis_tcp_2proc" in out:
        s = out["redis_tcp_2proc"]
        need = TWO_PROCESS_CORES
        cores = machine["cores"]
        print()
        vr = s.get("vs_one_process_runs") or {}
        print(f"two processes on one port (runs interleaved with the one-process runs): "
              f"{_pct(s.get('vs_one_process'))} [{_pct(vr.get('min'))}-{_pct(vr.get('max'))}] of one process's "
              f"pairs/s; connections per process by run {s['connections_per_process']}")
        busy = s["machine_busy"]["median"] or 0
        if cores < need or busy >= 0.9:
            print(f"  the cores do not allow scaling here: {cores} cores for 2 services + Redis + the generator "
                  f"(machine {busy:.0%} busy during the runs); 1.5x needs >= {need} cores")
            s["cores_allow"] = False
        else:
            s["cores_allow"] = True
    for n in lag_report(out, a.held):
        b.notes.append(n)
    problems += outages_report(out)
    for s in out.values():
        if s["kind"] in ("info", "outages"):
            continue
        if s["error_count"] or s["lost"]:
            problems.append(f"{s['label']}: {s['error_count']} errors {s['errors']}, {s['lost']} lost")
    gen_bound = [s["label"] for s in closed if (s["generator_core"]["median"] or 0) >= 0.9]
    noisy = [f"{s['label']} ({s['other_cores']['median']:.0%})" for s in [*closed, *opened]
             if (s["other_cores"]["median"] or 0) >= 0.25]
    print()
    if closed:
        print("CPU: shares of one core over the measured window used by the load generator, by the servers "
              "(service(s) + Redis), and by every other process on the machine (noise).")
    if noisy:
        print("note: other processes used >= 25 % of a core during: " + "; ".join(noisy)
              + " - those figures are noisy.")
    if gen_bound:
        print("note: the load generator used >= 90 % of a core in: " + "; ".join(gen_bound)
              + " - those rates may be the generator's limit, so ratios to them flatter the service.")
    for n in b.notes:
        print(f"note: {n}")
    if problems:
        print("!" * 118)
        print("!! THIS RUN HAD ERRORS OR LOST REPLIES - its figures are not clean:")
        for p in problems:
            print(f"!!   {p}")
        print("!" * 118)
    else:
        print("no errors, no lost replies: every counted pair was a check allowed and an end released.")
    return problems


def machine_info() -> dict[str, Any]:
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    versions = {}
    for pkg in ("orjson", "uvloop", "redis", "hiredis", "pyrad", "structlog"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[pkg] = metadata.version(pkg)
    git = {}
    with contextlib.suppress(Exception):
        git["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                       check=True).stdout.strip()
        git["dirty"] = bool(subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True,
                                           text=True).stdout.strip())
    return {"cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "cpu_count": os.cpu_count(), "cpu": cpu, "python": platform.python_version(),
            "kernel": platform.release(), "hostname": socket.gethostname(), "versions": versions, "git": git,
            "loadavg_start": os.getloadavg()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--two-processes", action="store_true",
                    help=f"run the two-processes-on-one-port Redis runs even on fewer than {TWO_PROCESS_CORES} cores")
    ap.add_argument("--only", default=",".join(SECTIONS), help=f"comma list of {', '.join(SECTIONS)}")
    ap.add_argument("--quick", action="store_true", help="smoke test: short runs, 5,000 held calls")
    ap.add_argument("--runs", type=int, default=3, help="runs per figure (median, min-max)")
    ap.add_argument("--seconds", type=float, default=12.0, help="closed-loop measured window (> snapshot interval)")
    ap.add_argument("--open-seconds", type=float, default=12.0, help="open-loop measured window")
    ap.add_argument("--warmup", type=float, default=1.0)
    ap.add_argument("--held", type=int, default=100_000, help="background of held (answered) calls per server")
    ap.add_argument("--conns", type=int, default=8)
    ap.add_argument("--depth", type=int, default=64, help="requests outstanding per connection (TCP, Unix)")
    ap.add_argument("--udp-window", type=int, default=32, help="requests outstanding per UDP socket")
    ap.add_argument("--open-conns", type=int, default=4)
    ap.add_argument("--hold", type=float, default=1.0, help="open loop: seconds from a check to its end")
    ap.add_argument("--rates-embedded", default="2000", help="open-loop offered pairs/s, embedded store")
    ap.add_argument("--rates-redis", default="1000,2000", help="open-loop offered pairs/s, Redis store")
    ap.add_argument("--phase-calls", type=int, default=10_000, help="calls per Redis script-timing phase")
    ap.add_argument("--outage-rate", type=float, default=500.0, help="offered checks/s in the Redis outage phases")
    ap.add_argument("--outage-seconds", type=float, default=4.0, help="length of each outage phase (0: skip them)")
    ap.add_argument("--rates-cluster", default="1000", help="open-loop offered pairs/s, Redis Cluster store")
    ap.add_argument("--cluster-primaries", type=int, default=3, help="Redis Cluster: primaries")
    ap.add_argument("--cluster-replicas", type=int, default=0, help="Redis Cluster: replicas per primary")
    ap.add_argument("--no-client-cost", dest="client_cost", action="store_false",
                    help="skip the redis-py RedisCluster vs own pipes client-CPU measurement")
    ap.add_argument("--client-cost-commands", type=int, default=20_000)
    ap.add_argument("--radius-window", type=int, default=32)
    ap.add_argument("--redis-benchmark", action="store_true", help="also run redis-benchmark on reserve.lua")
    ap.add_argument("--pin", action="store_true", help="pin servers to the last CPU, everything else to the others")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directories (logs, snapshots)")
    ap.add_argument("--json", default=str(BENCH / "results.json"), help="where to write the summary ('' for none)")
    args = ap.parse_args(argv)
    if args.quick:
        args.seconds = min(args.seconds, 2.0)
        args.open_seconds = min(args.open_seconds, 2.0)
        args.warmup = min(args.warmup, 0.5)
        args.held = min(args.held, 5000)
        args.phase_calls = min(args.phase_calls, 1000)
        args.outage_seconds = min(args.outage_seconds, 2.0)
        args.client_cost_commands = min(args.client_cost_commands, 2000)
    if args.runs < 1:
        ap.error("--runs must be >= 1")
    args.rates_embedded = [float(x) for x in args.rates_embedded.split(",") if x]
    args.rates_redis = [float(x) for x in args.rates_redis.split(",") if x]
    args.rates_cluster = [float(x) for x in args.rates_cluster.split(",") if x]
    sections = [x for x in args.only.split(",") if x]
    for x in sections:
        if x not in SECTIONS:
            ap.error(f"--only: unknown section {x!r}")
    args.sections = sections
    shipped = tomllib.loads((ROOT / "service.toml").read_text())
    settings = {
        "held": args.held, "runs": args.runs, "seconds": args.seconds, "open_seconds": args.open_seconds,
        "warmup": args.warmup, "conns": args.conns, "depth": args.depth, "udp_window": args.udp_window,
        "open_conns": args.open_conns, "hold": args.hold, "rates_embedded": args.rates_embedded,
        "rates_redis": args.rates_redis, "phase_calls": args.phase_calls, "radius_window": args.radius_window,
        "outage_rate": args.outage_rate, "outage_seconds": args.outage_seconds,
        "rates_cluster": args.rates_cluster, "cluster_primaries": args.cluster_primaries,
        "cluster_replicas": args.cluster_replicas,
        "pinned": bool(args.pin), "quick": args.quick, "sections": sections,
        "snapshot_interval": shipped.get("store", {}).get("snapshot_interval", 10.0),
        "service_toml": "the shipped service.toml; listeners on free loopback ports, metrics off"
                        " (+ reuse_port for two processes, + [radius] for RADIUS)",
    }
    machine = machine_info()

    def terminated(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt  # so the finally below stops every process this bench started

    signal.signal(signal.SIGTERM, terminated)
    b = Bench(args)
    t0 = time.monotonic()
    failed: list[str] = []
    try:
        print(f"callpolicy bench: {machine['cores']} cores, sections {', '.join(sections)}; "
              f"{'pinned' if b.pinned else 'unpinned'}; work dir {b.top}", flush=True)
        b.baseline = b.start_baseline()
        print("== baseline ==", flush=True)
        b.hold_background("baseline", ["--tcp", f"127.0.0.1:{b.baseline.info['port']}"], [b.baseline.pid])
        for name in sections:
            try:
                getattr(b, f"section_{name}")()
            except Exception as exc:
                failed.append(f"{name}: {exc}")
                print(f"!! section {name} failed: {exc}", flush=True)
    except KeyboardInterrupt:
        print("interrupted", flush=True)
        failed.append("interrupted")
    finally:
        b.cleanup()
    machine["loadavg_end"] = os.getloadavg()
    machine["versions"].update(b.versions)
    out = summarize(b)
    problems = report(b, out, machine, settings)
    elapsed = time.monotonic() - t0
    print(f"bench took {elapsed / 60:.1f} min")
    for f in failed:
        print(f"!! FAILED: {f}")
    if args.json:
        doc = {"when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "elapsed_s": round(elapsed, 1), "machine": machine,
               "settings": settings, "servers": b.servers, "background": b.background, "scenarios": out,
               "problems": problems, "failed": failed, "notes": b.notes}
        Path(args.json).write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2))
        print(f"summary written to {args.json}")
    return 1 if problems or failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
