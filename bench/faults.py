"""Redis outages under load (issue 10: "Redis outages cost nothing extra").

One `callpolicy serve --store redis://...` with its background of held calls; open-loop checks
(`loadgen.py open --ops check`: every call new, checks only, so every phase does the same
work) at `--outage-rate` (500/s) for `--outage-seconds` (4 s) in each phase, one loadgen run
per phase, scheduled from a wall-clock start the bench chose, so the fault lands at a known
point of the schedule:

1. **up**: Redis answering (the reference).
2. **stopped**: Redis SIGSTOPped 0.25 s into the phase (a hung Redis: the connection stays
   open, nothing answers).
3. **killed**: the stopped Redis SIGKILLed 0.25 s into the phase (connection refused until a
   restart). It stays dead until the next phase.
4. **restarted**: 1 s into the phase a new, empty `redis-server` on the same port: the store
   reconnects, finds its epoch marker gone (data loss: `store_info.data_losses`) and trusts
   its counts again once it has adopted a new one. Reported: how long after the new Redis
   answered PING the last check failed with a store error (`exact again after`), and the
   first check admitted.

Per phase: check latency p50/p99/max from the scheduled send against `store.timeout` (50 ms)
and the replies over it. A hang is noticed only when an operation's deadline passes, and
operations already waiting keep their own deadline, so the checks in flight or sent during
the first `store.timeout` after a SIGSTOP wait it out (about rate x timeout of them: 25 at
500/s); those answered within the timeout + 10 ms are listed as "held by the fault" (and stay
in the percentiles); any other reply over the bound, and any lost reply, is a failure. The
service's CPU per check (all its
threads' `/proc/PID/task/*/schedstat` on-CPU time, from the fault (or the phase start) to
100 ms after the last scheduled check, divided by the checks scheduled in that span) as a
ratio to the `up` phase (target <= 2x); the answers: in an outage a check must be answered
with `store_error` and the decision the rules give for it (`on_store_error = "deny"` for the
account and user caps every bench call meets): counted as the expected outcome, not as an
error. Anything else (another error, an allow without the store in an outage, a store error
while Redis is up) is a failure. The loop's longest stall and busy time per phase come from the
probe's per-second history read after the last phase (`stats` needs the store).
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(ROOT))

from lag import read_stats  # noqa: E402

from policy.looplag import window  # noqa: E402
from tests.helpers import RedisServer  # noqa: E402

if TYPE_CHECKING:
    from bench import Bench, Proc

#: issue 10: CPU per check with Redis down within this factor of Redis up
CPU_TARGET = 2.0
#: what a bench check meets in the shipped rules when the store cannot be asked
ON_STORE_ERROR = "deny"
#: a check in flight when Redis hangs waits store.timeout; it may be answered this much later
#: (the service's own scheduling: the loop-stall target) and still count as "held by the hang"
SLACK_MS = 10.0
OK_KIND = "check:ok"
OUTAGE_KIND = f"check:store_error:{ON_STORE_ERROR}"
LEAD = 1.0  # seconds between launching loadgen and its first scheduled check (its start-up)
IDLE = 1.0  # seconds of the service's idle CPU measured before the phases
FAULT_AT = 0.25  # seconds into the stopped and killed phases (at most a quarter of a phase)
RESTART_AT = 1.0  # seconds into the restarted phase (at most a third of a phase)


def cpu_ns(pid: int) -> int:
    """Nanoseconds every thread of a process spent on a CPU (/proc/PID/task/*/schedstat)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError, ValueError, IndexError):
            total += int((task / "schedstat").read_text().split()[0])
    return total


def _sleep_until(t: float) -> None:
    while True:
        left = t - time.time()
        if left <= 0:
            return
        time.sleep(min(left, 0.05))


def classify(phase: str, outcomes: dict[str, dict[str, Any]]) -> dict[str, int]:
    """Answers of a phase by meaning: `ok` (allowed, counted), `store_error` (the rules' answer
    without the store: expected in an outage), `unexpected` (anything else, or a store error
    while Redis is up)."""
    out = {"ok": 0, "store_error": 0, "unexpected": 0}
    for kind, o in outcomes.items():
        if kind == OK_KIND:
            out["ok"] += o["n"]
        elif kind == OUTAGE_KIND and phase != "up":
            out["store_error"] += o["n"]
        else:
            out["unexpected"] += o["n"]
    return out


def split_slow(slow_at: list[list[Any]], slow: int, window: tuple[float, float] | None,
               bound_ms: float) -> tuple[list[list[Any]], int]:
    """The replies over the bound that the fault explains (scheduled inside `window`, seconds
    into the phase: from one store.timeout before the fault to one after, so in flight or sent
    while Redis hung unnoticed, and answered within bound + SLACK_MS), and how many others."""
    held = [x for x in slow_at if window is not None and window[0] <= x[1] <= window[1]
            and x[2] <= bound_ms + SLACK_MS]
    return held, slow - len(held)


def slow_cause(p: dict[str, Any], bound_ms: float) -> str:
    """What the phase's figures say about late replies: the service's loop late (its own work,
    or the OS not running it), or on time (the time went to Redis or the generator)."""
    lp = p.get("loop") or {}
    lag = (p.get("send_lag") or {}).get("max")
    gen = f", the generator sent up to {lag:.0f} ms late" if isinstance(lag, (int, float)) else ""
    mx, busy = lp.get("max_ms"), lp.get("busy_max_ms")
    if mx is None or busy is None:
        return f"no loop figures{gen}"
    head = f"the phase's loop lag max {mx:.0f} ms, busy max {busy:.0f} ms{gen}"
    if mx >= 0.5 * bound_ms:
        return head + (": the OS did not run the service" if busy < 0.5 * mx else ": the service's own work")
    return head + ": the loop was on time, the wait was elsewhere (Redis, the generator, the machine)"


def phase_problems(name: str, p: dict[str, Any], bound_ms: float) -> list[str]:
    """What in a phase is a failure: lost replies, replies over the bound that the fault does
    not explain, unexpected answers."""
    probs = []
    if p["lost"]:
        probs.append(f"{p['lost']} lost replies")
    if p["slow_other"]:
        why = f" ({slow_cause(p, bound_ms)})"
        probs.append(f"{p['slow_other']} checks answered later than store.timeout ({bound_ms:g} ms) from the "
                     f"scheduled send, outside the first store.timeout of the fault{why}")
    if p["answers"]["unexpected"]:
        bad = {k: v["n"] for k, v in p["outcomes"].items() if k not in (OK_KIND, OUTAGE_KIND) or
               (name == "up" and k == OUTAGE_KIND)}
        probs.append(f"unexpected answers {bad}")
    return [f"Redis outage phase {name}: {x}" for x in probs]


class Outages:
    """The four phases on one service and its Redis (which is SIGKILLed, then replaced)."""

    def __init__(self, b: Bench, redis: RedisServer, svc: Proc) -> None:
        self.b = b
        self.redis = redis
        self.svc = svc
        a = b.args
        self.rate = a.outage_rate
        self.seconds = a.outage_seconds
        shipped = tomllib.loads((ROOT / "service.toml").read_text())
        self.timeout_ms = float(shipped.get("store", {}).get("timeout", 0.05)) * 1000.0
        self.new_redis: RedisServer | None = None
        self.fault_at = round(min(FAULT_AT, self.seconds / 4), 3)  # seconds into the phase
        self.restart_at = round(min(RESTART_AT, self.seconds / 3), 3)

    def loadgen_argv(self, start_at: float) -> list[str]:
        a = self.b.args
        return [sys.executable, str(BENCH / "loadgen.py"), "open", "--tcp", f"127.0.0.1:{self.svc.info['port']}",
                "--rate", str(self.rate), "--seconds", str(self.seconds), "--warmup", "0",
                "--conns", str(a.open_conns), "--ops", "check", "--start-at", f"{start_at:.6f}",
                "--bound-ms", str(self.timeout_ms), "--tag", self.b.tag(), "--pid", str(self.svc.pid)]

    def phase(self, name: str, action: Callable[[], Any] | None = None, at: float = 0.0) -> dict[str, Any]:
        """One loadgen run; `action` at `at` seconds into its schedule; CPU from then to the end."""
        start_at = time.time() + LEAD
        proc = subprocess.Popen(self.loadgen_argv(start_at), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                preexec_fn=self.b._pin_other if self.b.pinned else None)
        try:
            _sleep_until(start_at + at)
            t_action = t_done = time.time()
            if action is not None:
                action()
                t_done = time.time()
            c0 = cpu_ns(self.svc.pid)
            t_c0 = time.time()
            _sleep_until(start_at + self.seconds + 0.1)
            c1 = cpu_ns(self.svc.pid)
            t_c1 = time.time()
            out, err = proc.communicate(timeout=self.seconds + 120)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        if proc.returncode != 0:
            raise RuntimeError(f"loadgen ({name}) failed ({proc.returncode}):\n{err.decode(errors='replace')[-3000:]}")
        r: dict[str, Any] = orjson.loads(out.strip().splitlines()[-1])
        lat = r["latency"]["check"]
        start_wall = r["start_wall"]
        # checks scheduled while the CPU was counted (the schedule is one check every 1/rate s)
        span = min(self.seconds, t_c1 - start_wall) - max(t_c0 - start_wall, 0.0)
        checks = max(1, round(span * self.rate))
        action_at = t_action - start_wall
        bound_s = self.timeout_ms / 1000.0
        win = (action_at - bound_s, t_done - start_wall + bound_s) if action else None
        slow = r.get("slow", {}).get("check", 0)
        held, other = split_slow(r.get("slow_at", []), slow, win, self.timeout_ms)
        res = {
            "phase": name, "start_wall": start_wall, "end_wall": start_wall + self.seconds,
            "late_start_s": round(start_wall - start_at, 4),
            "action_at_s": round(t_action - start_wall, 4) if action else None,
            "action_took_s": round(t_done - t_action, 4) if action else None,
            "checks": r["sent"]["check"], "latency": lat, "lost": r["lost"],
            "slow": slow, "slow_held_by_fault": len(held), "slow_other": other, "bound_ms": self.timeout_ms,
            "slow_held_max_ms": max((x[2] for x in held), default=None), "slow_at": r.get("slow_at", []),
            "outcomes": r["outcomes"], "answers": classify(name, r["outcomes"]), "errors": r["errors"],
            "cpu_s": (c1 - c0) / 1e9, "cpu_checks": checks, "cpu_us_per_check": (c1 - c0) / 1e3 / checks,
            "cpu_window_s": round(t_c1 - t_c0, 3), "send_lag": r["send_lag"], "machine": r["cpu"],
        }
        return res

    def run(self) -> dict[str, Any]:
        b, redis = self.b, self.redis
        unix = self.svc.info["unix"]
        print(f"  outages: checks only (every call new) at {self.rate:,.0f}/s, {self.seconds:g} s per phase, "
              f"bound store.timeout {self.timeout_ms:g} ms", flush=True)
        before = read_stats(unix)
        c0, t0 = cpu_ns(self.svc.pid), time.perf_counter()
        time.sleep(IDLE)  # the service's idle CPU (timers, sweeps): part of every phase's figure
        idle_ms_per_s = (cpu_ns(self.svc.pid) - c0) / 1e6 / (time.perf_counter() - t0)
        print(f"  service idle: {idle_ms_per_s:.1f} ms CPU per second "
              f"({idle_ms_per_s * 1000 / self.rate:.0f} us per check at {self.rate:,.0f}/s)", flush=True)
        phases: dict[str, dict[str, Any]] = {}
        assert redis.proc is not None
        redis_pid = redis.proc.pid
        stopped = False
        try:
            phases["up"] = self.phase("up")
            self._show(phases["up"], phases["up"])

            def stop() -> None:
                nonlocal stopped
                os.kill(redis_pid, signal.SIGSTOP)
                stopped = True

            phases["stopped"] = self.phase("stopped", stop, self.fault_at)
            self._show(phases["stopped"], phases["up"])
            phases["killed"] = self.phase("killed", lambda: redis.stop(signal.SIGKILL), self.fault_at)
            stopped = False
            self._show(phases["killed"], phases["up"])
            ready: dict[str, float] = {}

            def restart() -> None:
                ready["spawned"] = time.time()
                self.new_redis = RedisServer(port=redis.port).start()
                ready["ready"] = time.time()
                if b.pinned and self.new_redis.proc is not None:
                    os.sched_setaffinity(self.new_redis.proc.pid, set(b.cpus[:-1]))

            phases["restarted"] = self.phase("restarted", restart, self.restart_at)
            back = phases["restarted"]
            # from the moment redis-server was started (an operator's restart); it answered
            # PING redis_ready_after_s later (the bench polls every 50 ms)
            back["redis_spawned_at_s"] = round(ready["spawned"] - back["start_wall"], 4)
            back["redis_ready_after_s"] = round(ready["ready"] - ready["spawned"], 4)
            oc = back["outcomes"]
            if OUTAGE_KIND in oc:
                back["exact_after_s"] = round(oc[OUTAGE_KIND]["last_s"] - back["redis_spawned_at_s"], 4)
            if OK_KIND in oc:
                back["first_allowed_after_s"] = round(oc[OK_KIND]["first_s"] - back["redis_spawned_at_s"], 4)
            self._show(back, phases["up"])
        finally:
            if stopped:
                with contextlib.suppress(OSError):
                    os.kill(redis_pid, signal.SIGCONT)
        after = None
        deadline = time.monotonic() + 15
        while after is None and time.monotonic() < deadline:
            after = read_stats(unix)
            if after is None:
                time.sleep(0.2)
        per_second = (after or {}).get("loop", {}).get("per_second", [])
        for p in phases.values():
            p["loop"] = window(per_second, p["start_wall"], p["end_wall"]) if after else None
        si0 = (before or {}).get("store_info", {})
        si1 = (after or {}).get("store_info", {})
        store = {k: si1.get(k) for k in ("state", "data_losses", "last_rebuild_seconds", "connects",
                                         "connect_failures", "errors", "late_replies")}
        store["data_losses_in_phases"] = (si1.get("data_losses") or 0) - (si0.get("data_losses") or 0)
        store["held_before"] = (before or {}).get("dialogs", {}).get("active_dialogs")
        store["held_after"] = (after or {}).get("dialogs", {}).get("active_dialogs")
        up_cpu = phases["up"]["cpu_us_per_check"]
        for p in phases.values():
            p["cpu_vs_up"] = p["cpu_us_per_check"] / up_cpu if up_cpu else None
        problems = [x for name, p in phases.items() for x in phase_problems(name, p, self.timeout_ms)]
        if after is None:
            problems.append("Redis outage phases: the service's stats did not answer after the restart")
        if "exact_after_s" not in phases["restarted"] and OK_KIND not in phases["restarted"]["outcomes"]:
            problems.append("Redis outage phase restarted: no check was admitted after Redis came back")
        res = {"phases": phases, "store": store, "rate": self.rate, "seconds": self.seconds,
               "fault_at_s": self.fault_at, "restart_at_s": self.restart_at,
               "bound_ms": self.timeout_ms, "slack_ms": SLACK_MS, "idle_cpu_ms_per_s": round(idle_ms_per_s, 3),
               "problems": problems}
        for p in phases.values():
            lp = p["loop"] or {}
            print(f"  {p['phase']:<10} loop lag max {_ms(lp.get('max_ms'))} ms, "
                  f"busy max {_ms(lp.get('busy_max_ms'))} ms, stalls {lp.get('stalls', '-')}", flush=True)
        print(f"  store after the phases: {store}", flush=True)
        return res

    def _show(self, p: dict[str, Any], up: dict[str, Any]) -> None:
        lat = p["latency"]
        ratio = p["cpu_us_per_check"] / up["cpu_us_per_check"] if up["cpu_us_per_check"] else math.nan
        extra = ""
        if p["phase"] == "restarted":
            extra = (f"  Redis restarted {p['redis_spawned_at_s']:.2f} s in (PING answered "
                     f"{p['redis_ready_after_s']:.3f} s later); exact again {_s(p.get('exact_after_s'))} s after "
                     "the restart")
        print(f"  {p['phase']:<10} check p50 {_ms(lat['p50'])} p99 {_ms(lat['p99'])} max {_ms(lat['max'])} ms, "
              f"over {p['bound_ms']:g} ms: {p['slow_held_by_fault']} held by the fault + {p['slow_other']} others, "
              f"lost {p['lost']}; CPU {p['cpu_us_per_check']:.0f} us/check ({ratio:.2f}x up); "
              f"answers {p['answers']}{extra}", flush=True)

    def cleanup(self) -> None:
        if self.new_redis is not None:
            with contextlib.suppress(Exception):
                self.new_redis.stop()
            shutil.rmtree(self.new_redis.dir, ignore_errors=True)
            self.new_redis = None


def run_outages(b: Bench, redis: RedisServer, svc: Proc) -> None:
    """The phases on a running service (the Redis section's, after its other figures): Redis is
    killed and replaced by an empty one, which is stopped at the end."""
    o = Outages(b, redis, svc)
    try:
        res = o.run()
    finally:
        o.cleanup()
    s = b.scenario("redis_outages", f"Redis outages, open loop @ {o.rate:,.0f} checks/s", "outages")
    s["runs"].append(res)


def section(b: Bench) -> None:
    """`--only outages`: a Redis, one service, the background of held calls, the phases."""
    if shutil.which("redis-server") is None:
        raise RuntimeError("redis-server is not installed")
    print("\n== Redis outages ==", flush=True)
    redis = RedisServer().start()
    b.redis = redis
    assert redis.proc is not None
    if b.pinned:
        os.sched_setaffinity(redis.proc.pid, set(b.cpus[:-1]))
    svc = b.start_service("outages", store=redis.url)
    try:
        b.hold_background("outages", ["--tcp", f"127.0.0.1:{svc.info['port']}"], [svc.pid, redis.proc.pid],
                          depth=16)
        run_outages(b, redis, svc)
    finally:
        b.stop(svc)
        redis.stop()
        b.redis = None
        shutil.rmtree(redis.dir, ignore_errors=True)


# -- summary -----------------------------------------------------------------------------------

def _ms(v: Any) -> str:
    if v is None:
        return "lost"
    if isinstance(v, float) and math.isnan(v):
        return "-"
    return f"{v:.2f}" if v < 10 else f"{v:.1f}" if v < 100 else f"{v:.0f}"


def _s(v: Any) -> str:
    return "-" if v is None else f"{v:.3f}"


def report(out: dict[str, Any]) -> list[str]:
    """Print the outage table; returns the problems (failures) it found."""
    s = out.get("redis_outages")
    if not s or not s.get("runs"):
        return []
    res = s["runs"][-1]
    bound = res["bound_ms"]
    print()
    print(f"Redis outages: checks only at {res['rate']:,.0f}/s, {res['seconds']:g} s per phase, the fault "
          f"{res['fault_at_s']:g} s in (restart: {res['restart_at_s']:g} s in); latency from the SCHEDULED send, "
          f"bound store.timeout {bound:g} ms; CPU: the service's, all threads")
    print(f"{'phase':<11} {'p50':>6} {'p99':>6} {'max':>7} {'>bound: fault/other':>20} {'lost':>5} "
          f"{'us/check':>9} {'vs up':>6} {'allowed':>8} {'store_err':>9} {'other':>6} "
          f"{'loop max':>9} {'busy':>6} {'stalls':>6}")
    for name, p in res["phases"].items():
        lat, lp = p["latency"], p.get("loop") or {}
        slow = f"{p['slow_held_by_fault']}/{p['slow_other']}"
        print(f"{name:<11} {_ms(lat['p50']):>6} {_ms(lat['p99']):>6} {_ms(lat['max']):>7} {slow:>20} {p['lost']:>5} "
              f"{p['cpu_us_per_check']:>9.0f} {p['cpu_vs_up']:>5.2f}x {p['answers']['ok']:>8} "
              f"{p['answers']['store_error']:>9} {p['answers']['unexpected']:>6} {_ms(lp.get('max_ms')):>9} "
              f"{_ms(lp.get('busy_max_ms')):>6} {lp.get('stalls', '-'):>6}")
    print(f"(service idle: {res['idle_cpu_ms_per_s']:.1f} ms CPU/s, included above; '>bound fault' = checks in "
          f"flight or sent during the first {bound:g} ms of the fault, which wait store.timeout by design, "
          f"answered within {bound + res['slack_ms']:g} ms)")
    back = res["phases"].get("restarted", {})
    st = res["store"]
    print(f"restarted empty: redis-server started {_s(back.get('redis_spawned_at_s'))} s into the phase (PING "
          f"answered {_s(back.get('redis_ready_after_s'))} s later); the last check answered from on_store_error "
          f"was scheduled {_s(back.get('exact_after_s'))} s after the start, the first admitted one "
          f"{_s(back.get('first_allowed_after_s'))} s after; data losses detected: "
          f"{st.get('data_losses_in_phases')} (rebuild {st.get('last_rebuild_seconds')} s, no reconciliation "
          f"configured: the {st.get('held_before') or 0:,} calls held before are no longer counted)")
    outage = [p for n, p in res["phases"].items() if n != "up"]
    worst_cpu = max((p["cpu_vs_up"] for p in outage if p["cpu_vs_up"] is not None), default=None)
    cpu_met = worst_cpu is not None and worst_cpu <= CPU_TARGET
    p99s = [p["latency"]["p99"] for p in res["phases"].values()]
    p99_met = all(v is not None and v <= bound for v in p99s)
    others = sum(p["slow_other"] + p["lost"] for p in res["phases"].values())
    held = sum(p["slow_held_by_fault"] for p in res["phases"].values())
    held_max = max((p["slow_held_max_ms"] for p in res["phases"].values() if p["slow_held_max_ms"]), default=None)
    print(f"targets: CPU per check in an outage <= {CPU_TARGET:g}x up: {'met' if cpu_met else 'MISSED'} "
          f"(worst {worst_cpu:.2f}x); check p99 <= {bound:g} ms in every phase: {'met' if p99_met else 'MISSED'} "
          f"(worst {_ms(max(p99s, key=lambda v: math.inf if v is None else v))} ms); "
          f"checks over {bound:g} ms outside the first {bound:g} ms of a fault, or lost: {others}; "
          f"held by a fault: {held}" + (f" (max {_ms(held_max)} ms)" if held else ""))
    return list(res["problems"])
