"""The service's event loop during each bench run: longest stall, busy time, stalls, snapshots.

`callpolicy serve` runs a loop-lag probe (`policy/looplag.py`): a 10 ms timer whose lateness is
the loop's stall, and the loop thread's own CPU between two firings (`busy`: a stall of our
own making shows in both, the OS not running us only in the lag). Its `stats` entry `loop` is
never reset; it lists the last 120 wall-clock seconds (`per_second`). Around every service run
the bench reads `stats` over the service's Unix socket just before and just after, and keeps:

- `max_ms` / `busy_max_ms`: the largest of the seconds the run overlapped (its first second
  to its last: up to a second more on each side than the run itself);
- `stalls`: firings later than 10 ms between the two reads (the probe's counter), `samples`;
- `compactions`: journal compactions into the snapshot between the two reads (embedded store:
  `store_info.compactions`), with the last one's child-process and wall time.

`report()` prints them per scenario and the headline: the embedded open loop at 2,000/s with
the background of held calls and snapshots on (target: longest stall <= 10 ms).
"""

from __future__ import annotations

import contextlib
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from policy.looplag import window  # noqa: E402
from tests.helpers import LineClient  # noqa: E402

#: issue 10: the loop's longest stall with 100k held calls and default settings
STALL_TARGET_MS = 10.0
HEADLINE = "embedded_open2000"


def read_stats(unix: str, timeout: float = 5.0) -> dict[str, Any] | None:
    """The `stats` body of the service on this Unix socket, or None if it does not answer."""
    try:
        c = LineClient(unix=unix, timeout=timeout)
    except OSError:
        return None
    try:
        r = c.call("stats")
        return r if r.get("ok") else None
    except (OSError, ValueError):
        return None
    finally:
        with contextlib.suppress(OSError):
            c.close()


def loop_figures(before: dict[str, Any] | None, after: dict[str, Any] | None,
                 start: float, end: float) -> dict[str, Any]:
    """One service's loop figures between two `stats` reads taken at wall times start and end."""
    if after is None or "loop" not in after:
        return {"available": False}
    lp = after["loop"]
    w = window(lp.get("per_second", []), start, end)
    out: dict[str, Any] = {"available": True, "max_ms": w["max_ms"], "busy_max_ms": w["busy_max_ms"],
                           "complete": w["complete"], "max_since_start_ms": lp.get("max_ms")}
    if before is not None and "loop" in before:
        out["stalls"] = lp["stalls"] - before["loop"]["stalls"]
        out["samples"] = lp["samples"] - before["loop"]["samples"]
    else:
        out["stalls"], out["samples"] = w["stalls"], w["samples"]
    si, si0 = after.get("store_info") or {}, (before or {}).get("store_info") or {}
    if "compactions" in si:
        out["compactions"] = si["compactions"] - si0.get("compactions", 0)
        out["last_snapshot_s"] = si.get("last_snapshot_s")
        out["last_compaction_s"] = si.get("last_compaction_s")
        out["last_snapshot_calls"] = si.get("last_snapshot_calls")
    return out


def merge(per_service: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Several services measured in one run (two processes, one port): the worst of them."""
    ok = [f for f in per_service if f.get("available")]
    if not ok:
        return {"available": False}
    out: dict[str, Any] = {"available": True, "complete": all(f["complete"] for f in ok),
                           "max_ms": _max([f["max_ms"] for f in ok]),
                           "busy_max_ms": _max([f["busy_max_ms"] for f in ok]),
                           "stalls": sum(f["stalls"] for f in ok), "samples": sum(f["samples"] for f in ok)}
    if any("compactions" in f for f in ok):
        out["compactions"] = sum(f.get("compactions", 0) for f in ok)
    if len(per_service) > 1:
        out["services"] = list(per_service)
    else:
        out.update({k: v for k, v in ok[0].items() if k not in out})
    return out


def observe(unix_sockets: Sequence[str], fn: Callable[[], dict[str, Any]]) -> Callable[[], dict[str, Any]]:
    """fn, plus r["loop"]: the services' loop figures over the run (stats read before and after)."""

    def run() -> dict[str, Any]:
        before = [read_stats(u) for u in unix_sockets]
        start = time.time()
        r = fn()
        end = time.time()
        after = [read_stats(u) for u in unix_sockets]
        r["loop"] = merge([loop_figures(b, a, start, end) for b, a in zip(before, after, strict=True)])
        if "compactions" in r["loop"]:
            r["snapshot_in_run"] = r["loop"]["compactions"] > 0
        return r

    return run


def _max(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return max(vals) if vals else None


def summarize_runs(runs: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """A scenario's loop figures over its runs: max lag and busy (median, min, max), stalls."""
    figs = [r["loop"] for r in runs if r.get("loop", {}).get("available")]
    if not figs:
        return None

    def stat(key: str) -> dict[str, Any]:
        vals = [f[key] for f in figs if f.get(key) is not None]
        if not vals:
            return {"median": None, "min": None, "max": None, "values": []}
        return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "values": vals}

    out: dict[str, Any] = {"max_ms": stat("max_ms"), "busy_max_ms": stat("busy_max_ms"),
                           "stalls": sum(f["stalls"] for f in figs), "samples": sum(f["samples"] for f in figs),
                           "runs": len(figs), "complete": all(f["complete"] for f in figs)}
    if any("compactions" in f for f in figs):
        out["compactions"] = sum(f.get("compactions", 0) for f in figs)
        out["runs_with_compaction"] = sum(1 for f in figs if f.get("compactions", 0) > 0)
    return out


def _ms(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.2f}" if v < 10 else f"{v:.1f}" if v < 100 else f"{v:.0f}"


def report(out: dict[str, Any], held: int) -> list[str]:
    """Print the loop table and the headline; returns notes worth repeating (targets missed)."""
    rows = [s for s in out.values() if s.get("loop")]
    notes: list[str] = []
    if not rows:
        return notes
    print()
    print("event loop during each run (the service's loop-lag probe, 10 ms timer; the run's worst second; "
          "busy = the loop thread's own CPU between two firings, lag >> busy = the OS did not run it):")
    print(f"{'':<46} {'lag max ms [min-max]':>24} {'busy max ms':>12} {'stalls>10ms':>12} {'probes':>8}  snapshots")
    for s in rows:
        lp = s["loop"]
        mx, busy = lp["max_ms"], lp["busy_max_ms"]
        lag = f"{_ms(mx['median'])} [{_ms(mx['min'])}-{_ms(mx['max'])}]"
        snap = "-"
        if "compactions" in lp:
            snap = f"{lp['runs_with_compaction']}/{lp['runs']} runs ({lp['compactions']} compactions)"
        flag = "" if lp["complete"] else "  (history did not cover the whole run)"
        print(f"{s['label']:<46} {lag:>24} {_ms(busy['max']):>12} {lp['stalls']:>12} {lp['samples']:>8}  "
              f"{snap}{flag}")
    head = out.get(HEADLINE)
    if head and head.get("loop"):
        lp, lat = head["loop"], head["latency"]["check"]
        worst = lp["max_ms"]["max"]
        met = worst is not None and worst <= STALL_TARGET_MS
        snaps = lp.get("runs_with_compaction", 0)
        print()
        per_run = ", ".join(_ms(v) for v in lp["max_ms"]["values"])
        busy_run = ", ".join(_ms(v) for v in lp["busy_max_ms"]["values"])
        print(f"HEADLINE {head['label']}, {held:,} held calls, snapshots every 10 s "
              f"({snaps}/{lp['runs']} runs with a compaction): check p99 {_ms(lat['p99']['median'])} ms, "
              f"p99.9 {_ms(lat['p999']['median'])} ms (medians of the runs); the loop's longest stall by run "
              f"{per_run} ms (loop busy {busy_run} ms), {lp['stalls']} stalls > 10 ms in all: "
              f"target <= {STALL_TARGET_MS:g} ms in every run {'met' if met else 'MISSED'}")
        if not met:
            busy = lp["busy_max_ms"]["max"] or 0.0
            why = ("the loop thread's own CPU was as long: work of the service's own on the loop"
                   if busy >= 0.5 * worst else
                   "the loop thread's CPU was much shorter: mostly the OS not running the service (a busy machine)")
            notes.append(f"loop stall target missed in {head['label']}: {_ms(worst)} ms > {STALL_TARGET_MS:g} ms, "
                         f"busy {_ms(busy)} ms: {why}")
    return notes
