"""Micro-benchmark of the rules: µs per `Ruleset.evaluate`, and loading a 10,000-line overrides file.

    .venv/bin/python bench/bench_rules.py

Best of 7 runs of 20,000 calls each; the cost of copying the request (evaluate adds derived
attributes to it) is measured apart and subtracted. Figures move by ~10 % between runs on a
shared machine: compare runs made one after the other.
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from policy.rules import Ruleset, compile_sources, load_rules  # noqa: E402

REQUESTS = {
    "domestic+account": {"call_id": "c1", "from": "sip:6001@example.com", "to": "sip:0301234@example.com",
                         "from_user": "6001", "from_domain": "example.com", "to_user": "0301234",
                         "to_domain": "example.com", "account": "acme"},
    "international": {"call_id": "c2", "from_user": "6001", "from_domain": "example.com",
                      "to_user": "00861012345678", "account": "other"},
    "emergency": {"call_id": "c3", "from_user": "6001", "from_domain": "example.com", "to_user": "112"},
}

# The shipped rules plus time: a night-time international block (rule schedule), peak and
# off-peak account caps (limit schedule), and a weekend rule on the weekday field.
TIMED = '''
[time]
tz = "Europe/Berlin"
[[rule]]
name = "night-international"
match = { type = "international" }
schedule = { hours = "22:00-06:00" }
limit = { profile = "international", max = 0 }
[[rule]]
name = "peak-account"
match = { account = { present = true } }
limit = { profile = "account", value = "peak:{account}", max = 10, schedule = [
  { days = "mon-fri", hours = "08:00-18:00", max = 20 }, { days = "sat-sun", max = 5 }] }
[[rule]]
name = "weekend"
match = { weekday = { in = ["sat", "sun"] } }
join = [{ profile = "total" }]
'''
# The shipped rules plus call rates: an account's (a value) and a platform-wide one (no value:
# a prebuilt entry), and one with peak/off-peak windows.
RATES = '''
[[rule]]
name = "account-cps"
match = { account = { present = true } }
rate = { value = "{account}", max = 10, per = 1, burst = 20 }
[[rule]]
name = "platform-cps"
rate = { max = 200 }
[[rule]]
name = "user-cps"
rate = { value = "{from_user}@{from_domain}", max = 2, schedule = [
  { days = "mon-fri", hours = "08:00-18:00", max = 5 }] }
'''
CHANNELS = '''
[[rule]]
name = "channels"
match = { account = { present = true } }
[rule.limit]
profile = "account"
value = "ch:{account}"
max = 10
max_from = "attrs.channels"
ceiling = 100
overrides_file = "accounts.csv"
'''
LINES = 10_000
NOW = 1_700_000_000.0  # a Tuesday, 23:13 in Berlin


def best(fn: Callable[[int], object], reps: int) -> float:
    """Best seconds per call over 7 runs."""
    out = float("inf")
    for _ in range(7):
        t0 = time.perf_counter()
        fn(reps)
        out = min(out, time.perf_counter() - t0)
    return out / reps


def per_evaluate(rs: Ruleset, req: dict[str, str], now: float | None, step: float = 0.0, reps: int = 20_000,
                 interpret: bool = False) -> float:
    """µs per evaluate (or interpret), the request copy subtracted; `step` moves the time each call."""
    def copies(n: int) -> None:
        t = now
        for _ in range(n):
            dict(req)
            if step:
                t += step  # type: ignore[operator]

    def evals(n: int) -> None:
        ev = rs.interpret if interpret else rs.evaluate
        t = now
        for _ in range(n):
            ev(dict(req), now=t)
            if step:
                t += step  # type: ignore[operator]

    return (best(evals, reps) - best(copies, reps)) * 1e6


def main() -> None:
    rules_dir = ROOT / "rules"
    shipped = load_rules(rules_dir)
    print(f"shipped rules ({len(shipped.rules)} rules), µs per evaluate:")
    for name, req in REQUESTS.items():
        fast = per_evaluate(shipped, req, None)
        ref = per_evaluate(shipped, req, None, reps=5_000, interpret=True)
        print(f"  {name:18s} {fast:5.2f}   (interpreter {ref:5.2f})")

    sources = [(str(f), f.read_text()) for f in sorted(rules_dir.glob("*.toml"))]
    timed = compile_sources([*sources, ("timed.toml", TIMED)])
    print(f"shipped + schedules and time fields ({len(timed.rules)} rules), µs per evaluate:")
    for name, req in REQUESTS.items():
        same = per_evaluate(timed, req, NOW)
        moving = per_evaluate(timed, req, NOW, step=61.0)
        print(f"  {name:18s} {same:5.2f}   (a new minute every call {moving:5.2f})")

    rated = compile_sources([*sources, ("rates.toml", RATES)])
    print(f"shipped + three call rates ({len(rated.rules)} rules), µs per evaluate:")
    for name, req in REQUESTS.items():
        fast = per_evaluate(rated, req, NOW)
        ref = per_evaluate(rated, req, NOW, reps=5_000, interpret=True)
        print(f"  {name:18s} {fast:5.2f}   (interpreter {ref:5.2f})")

    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        for f in sorted(rules_dir.glob("*.toml")):
            (d / f.name).write_text(f.read_text())
        (d / "zz-channels.toml").write_text(CHANNELS)
        csv = "value,max\n" + "".join(f"acct{i},{i % 50}\n" for i in range(LINES))
        (d / "accounts.csv").write_text(csv)
        loads = []
        for _ in range(5):
            t0 = time.perf_counter()
            rs = load_rules(d)
            loads.append(time.perf_counter() - t0)
        base = []
        for _ in range(5):
            t0 = time.perf_counter()
            load_rules(rules_dir)
            base.append(time.perf_counter() - t0)
        print(f"load_rules with a {LINES:,}-line overrides CSV: {min(loads) * 1e3:.1f} ms "
              f"(the shipped rules alone: {min(base) * 1e3:.1f} ms)")
        req = {**REQUESTS["domestic+account"], "account": "acct4321"}
        print(f"  evaluate, cap from the {LINES:,} overrides:     {per_evaluate(rs, req, None):5.2f} µs")
        req = {**req, "attrs.channels": "42"}
        print(f"  evaluate, cap from attrs.channels (max_from): {per_evaluate(rs, req, None):5.2f} µs")


if __name__ == "__main__":
    main()
