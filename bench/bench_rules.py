"""Micro-benchmark of rule evaluation: µs per `Ruleset.evaluate` for the shipped rules."""

from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from policy.rules import load_rules  # noqa: E402

REQUESTS = {
    "domestic+account": {"call_id": "c1", "from": "sip:6001@example.com", "to": "sip:0301234@example.com",
                         "from_user": "6001", "from_domain": "example.com", "to_user": "0301234",
                         "to_domain": "example.com", "account": "acme"},
    "international": {"call_id": "c2", "from_user": "6001", "from_domain": "example.com",
                      "to_user": "00861012345678", "account": "other"},
    "emergency": {"call_id": "c3", "from_user": "6001", "from_domain": "example.com", "to_user": "112"},
}


def per_call(fn: object, reps: int) -> float:
    best = float("inf")
    for _ in range(7):
        t0 = time.perf_counter()
        fn(reps)  # type: ignore[operator]
        best = min(best, time.perf_counter() - t0)
    return best / reps * 1e6


def main() -> None:
    rs = load_rules(ROOT / "rules")
    reps = 20000
    for name, req in REQUESTS.items():
        def copies(n: int, req: dict[str, str] = req) -> None:
            for _ in range(n):
                dict(req)

        def evals(n: int, req: dict[str, str] = req) -> None:
            ev = rs.evaluate
            for _ in range(n):
                ev(dict(req))

        base = per_call(copies, reps)
        total = per_call(evals, reps)
        print(f"{name:18s} evaluate: {total - base:5.2f} µs  (with the request copy {total:5.2f})")


if __name__ == "__main__":
    main()
