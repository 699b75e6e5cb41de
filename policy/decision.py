"""From a plan and what the store did with it to the answer a proxy gets. Pure.

`decide` turns a reservation into the reply body (allow/deny, code, reason, the limiting
rule, every profile's size) and the per-rule tallies the service counts; `store_down` is
the answer when the store could not be asked (each enforced limit's `on_store_error`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

from policy.plan import PlanEntry
from policy.rules import Ruleset
from policy.store.base import ReserveResult

STORE_DOWN_CODE = 503
STORE_DOWN_REASON = "Call policy store unavailable"
DEFAULT_CODE = 486
DEFAULT_REASON = "Call limit reached"


class Decision(NamedTuple):
    """The reply body, and (rule, outcome) pairs to count (none for a duplicate or a dry run)."""

    body: dict[str, Any]
    tallies: list[tuple[str, str]]


def decide(res: ReserveResult, plan: Sequence[PlanEntry], ruleset: Ruleset, count: bool = True) -> Decision:
    """The reply body for a reservation; `count` asks for the per-rule tallies."""
    profiles = []
    shadow = []
    tallies: list[tuple[str, str]] = []
    joined = 1 if res.admitted else 0  # sizes include an admitted (or already held) call
    count = count and not res.duplicate
    for i, entry in enumerate(plan):
        size = res.sizes[i]
        item: dict[str, Any] = {"profile": entry.profile, "value": entry.value, "size": size, "rule": entry.rule}
        if entry.limit is not None:
            item["limit"] = entry.limit
            before = size - joined
            if entry.shadow:
                item["shadow"] = True
                if before >= entry.limit:
                    shadow.append({"rule": entry.rule, "profile": entry.profile, "value": entry.value,
                                   "size": before, "limit": entry.limit})
                    if count:
                        tallies.append((entry.rule, "would_deny"))
                elif count:
                    tallies.append((entry.rule, "allow"))
            elif count:
                tallies.append((entry.rule, "deny" if res.blocked == i else "allow"))
        profiles.append(item)
    body: dict[str, Any] = {"decision": "allow" if res.admitted else "deny"}
    if res.blocked is not None:
        entry = plan[res.blocked]
        rule = ruleset.by_name.get(entry.rule)
        body["code"] = rule.code if rule else DEFAULT_CODE
        body["reason"] = rule.reason if rule else DEFAULT_REASON
        body["rule"] = entry.rule
    if res.duplicate:
        body["duplicate"] = True
    body["profiles"] = profiles
    body["shadow"] = shadow
    return Decision(body, tallies)


def limiting(res: ReserveResult, plan: Sequence[PlanEntry]) -> dict[str, Any] | None:
    """The limit that refused the call, as the decision log shows it."""
    if res.blocked is None:
        return None
    e = plan[res.blocked]
    return {"profile": e.profile, "value": e.value, "size": res.sizes[res.blocked], "limit": e.limit}


def store_down(plan: Sequence[PlanEntry], ruleset: Ruleset, error: str) -> Decision:
    """The answer when the store cannot be asked: denied (503) if any enforced limit the call
    meets says `on_store_error = "deny"`, else allowed uncounted."""
    denier = None
    for entry in plan:
        rule = ruleset.by_name.get(entry.rule)
        if entry.limit is not None and not entry.shadow and rule and rule.on_store_error == "deny":
            denier = entry.rule
            break
    body: dict[str, Any] = {"decision": "deny" if denier else "allow", "store_error": error,
                            "profiles": [], "shadow": []}
    if denier:
        body.update(code=STORE_DOWN_CODE, reason=STORE_DOWN_REASON, rule=denier)
    return Decision(body, [(denier or "-", "store_" + body["decision"])])


def dry_run(res: ReserveResult, plan: Sequence[PlanEntry], ruleset: Ruleset, outcomes: Sequence[Any],
            attrs: dict[str, str]) -> dict[str, Any]:
    """A dry run's reply: the decision it would be, and why each rule matched or not."""
    body = decide(res, plan, ruleset, count=False).body
    body["dry_run"] = True
    body["attrs"] = attrs
    body["explain"] = [o.as_dict(plan) for o in outcomes]  # rule, matched, why, entries, caps
    return body
