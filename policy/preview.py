"""The reload preview: which profile keys hold more calls than new rules allow, and by how many. Pure.

Given a `Ruleset` (the rules about to be, or just, loaded) and a time, `Preview` says which
sizes it needs - the whole size of every limited no-value profile, the per-value sizes of
every limited with-value profile - and is fed them by whoever can read them: the service
from its store after a reload (the `reload_preview` log line and the `reload` reply), the
CLI from a running service's admin ops (`callpolicy check-rules --against-live`). Nothing
here does I/O.

A key is **over** when its size is larger than its cap (`policy.caps`: the smallest cap of
the rules that limit the profile, with the override for the value and the schedule window
in force at that time; a `max_from` limit is taken at the cap a call without the field
meets, and flagged). Calls already held are never cut by a reload: an over key only refuses
new calls until `over + 1` of its calls have ended. A key exactly at its cap is full, not
over. The list is bounded (`max_items`, the keys most over first); `count` counts them all.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from policy.caps import Cap, ProfileCaps, profile_caps
from policy.rules import Ruleset

#: How many over-limit keys a preview keeps by default (the most over first).
MAX_ITEMS = 50


@dataclass(frozen=True, slots=True)
class Over:
    """One key over its cap."""

    profile: str
    value: str | None
    size: int
    cap: Cap

    @property
    def over(self) -> int:
        """How many calls more than the cap it holds."""
        return self.size - self.cap.limit

    def to_json(self) -> dict[str, Any]:
        """JSON-able: profile, value, size, limit, over, rule, how, shadow, per_call."""
        out: dict[str, Any] = {"profile": self.profile, "value": self.value, "size": self.size,
                               "limit": self.cap.limit, "over": self.over, "rule": self.cap.rule,
                               "how": self.cap.how}
        if self.cap.shadow:
            out["shadow"] = True
        if self.cap.per_call:
            out["per_call"] = self.cap.per_call
        return out

    @property
    def key(self) -> str:
        """'account=acme' or 'total'."""
        return self.profile if self.value is None else f"{self.profile}={self.value}"


@dataclass
class PreviewResult:
    """The keys over their caps (bounded, most over first) and how many there are in all."""

    over: list[Over] = field(default_factory=list)
    count: int = 0  # every over key, also those not in `over`
    calls_over: int = 0  # the sum of their `over`
    keys: int = 0  # keys looked at
    skipped: list[str] = field(default_factory=list)  # profiles whose sizes could not be read, and why

    @property
    def truncated(self) -> bool:
        """Whether `over` is shorter than `count`."""
        return self.count > len(self.over)

    def to_json(self) -> dict[str, Any]:
        """JSON-able summary (the `reload` reply's `preview`, the `reload_preview` log line)."""
        out: dict[str, Any] = {"over_limit": [o.to_json() for o in self.over], "count": self.count,
                               "calls_over": self.calls_over, "keys": self.keys, "truncated": self.truncated}
        if self.skipped:
            out["skipped"] = list(self.skipped)
        return out

    def lines(self) -> list[str]:
        """The summary as text lines (CLI, docs)."""
        if not self.count:
            out = [f"no profile key over its cap ({self.keys} keys looked at)"]
        else:
            out = [f"{self.count} profile key(s) over their cap by {self.calls_over} call(s) in all "
                   f"({self.keys} keys looked at); an enforced cap refuses new calls into its key until enough end:"]
            for o in self.over:
                out.append(f"  {o.key}: {o.size} calls, cap {o.cap.limit}, over by {o.over}  ({o.cap.describe()})")
            if self.truncated:
                out.append(f"  ... and {self.count - len(self.over)} more")
        out += [f"  not read: {s}" for s in self.skipped]
        return out


class Preview:
    """Collects the sizes a ruleset's caps apply to and keeps the keys over them."""

    def __init__(self, ruleset: Ruleset, now: float | None = None, max_items: int = MAX_ITEMS,
                 caps: dict[str, ProfileCaps] | None = None) -> None:
        self.ruleset = ruleset
        self.caps = caps if caps is not None else profile_caps(ruleset, now)
        self.max_items = max(0, max_items)
        self._heap: list[tuple[int, int, str, str, Over]] = []  # (over, size, profile, value, item): a min-heap
        self.result = PreviewResult()

    def whole_profiles(self) -> list[str]:
        """Limited no-value profiles: their whole size is needed (`profile_size PROFILE`)."""
        return sorted(p for p in self.caps if p in self.ruleset.no_value)

    def value_profiles(self) -> list[str]:
        """Limited with-value profiles: every value's size is needed (`profile_values PROFILE`)."""
        return sorted(p for p in self.caps if p in self.ruleset.with_value)

    def add(self, profile: str, value: str | None, size: int) -> None:
        """One key's size."""
        pc = self.caps.get(profile)
        self.result.keys += 1
        if pc is None:
            return
        cap = pc.cap_for(value)
        if cap is None or size <= cap.limit:
            return
        item = Over(profile, value, size, cap)
        res = self.result
        res.count += 1
        res.calls_over += item.over
        entry = (item.over, size, profile, value or "", item)
        if len(self._heap) < self.max_items:
            heapq.heappush(self._heap, entry)
        elif self._heap and entry[:4] > self._heap[0][:4]:
            heapq.heapreplace(self._heap, entry)

    def add_values(self, profile: str, items: Iterable[tuple[str, int]]) -> None:
        """A page of (value, size) of a with-value profile."""
        for value, size in items:
            self.add(profile, value, size)

    def skip(self, profile: str, why: str) -> None:
        """A profile whose sizes could not be read."""
        self.result.skipped.append(f"{profile}: {why}")

    def finish(self) -> PreviewResult:
        """The result: the kept keys, most over first."""
        self.result.over = [e[4] for e in sorted(self._heap, key=lambda e: e[:4], reverse=True)]
        return self.result
