"""From a plan and what the store did with it to the answer a proxy gets. Pure.

`decide` turns a reservation into the reply body (allow/deny, code, reason, the limiting
rule, every profile's size, every rate's tokens) and the per-rule tallies the service counts;
`store_down` is the answer when the store could not be asked (each enforced limit's and rate's
`on_store_error`).

A call refused by a rate answers the rule's `deny` (by default 503 "Call rate exceeded") and
names the rate (`rate`: rule, value, rate a second, burst); refused by both a limit and a rate,
it names the limit. A rule with both a limit and a rate is tallied once per check: `deny` if
either refused, `would_deny` if either (shadow) would have, else `allow`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

from policy.plan import PlanEntry, RateEntry
from policy.rules import Ruleset
from policy.store.base import ReserveResult

STORE_DOWN_CODE = 503
STORE_DOWN_REASON = "Call policy store unavailable"
DEFAULT_CODE = 486
DEFAULT_REASON = "Call limit reached"
RATE_CODE = 503
RATE_REASON = "Call rate exceeded"
#: A rule's tally when its limit and its rate disagree: the stronger outcome wins.
_RANK = {"allow": 0, "would_deny": 1, "deny": 2}


class Decision(NamedTuple):
    """The reply body, and (rule, outcome) pairs to count (none for a duplicate or a dry run)."""

    body: dict[str, Any]
    tallies: list[tuple[str, str]]


def rate_json(entry: RateEntry) -> dict[str, Any]:
    """A rate as replies and logs show it."""
    return {"rule": entry.rule, "value": entry.value, "rate": entry.rate, "burst": entry.burst}


def _tally(tallies: list[tuple[str, str]], rule: str, outcome: str) -> None:
    """Count `outcome` for `rule`, merged with what its limit already counted."""
    for k, (r, o) in enumerate(tallies):
        if r == rule:
            if _RANK[outcome] > _RANK[o]:
                tallies[k] = (rule, outcome)
            return
    tallies.append((rule, outcome))


def decide(res: ReserveResult, plan: Sequence[PlanEntry], ruleset: Ruleset, count: bool = True,
           rates: Sequence[RateEntry] = ()) -> Decision:
    """The reply body for a reservation; `count` asks for the per-rule tallies.

    On every check: one dict literal per profile, tallies only for the entries with a limit.
    """
    profiles = []
    shadow = []
    tallies: list[tuple[str, str]] = []
    admitted = res.admitted
    joined = 1 if admitted else 0  # sizes include an admitted (or already held) call
    count = count and not res.duplicate
    blocked = res.blocked
    for i, (entry, size) in enumerate(zip(plan, res.sizes, strict=True)):
        profile, value, limit, eshadow, rule = entry
        if limit is None:
            profiles.append({"profile": profile, "value": value, "size": size, "rule": rule})
        elif eshadow:
            profiles.append({"profile": profile, "value": value, "size": size, "rule": rule, "limit": limit,
                             "shadow": True})
            before = size - joined
            if before >= limit:
                shadow.append({"rule": rule, "profile": profile, "value": value, "size": before, "limit": limit})
                if count:
                    tallies.append((rule, "would_deny"))
            elif count:
                tallies.append((rule, "allow"))
        else:
            profiles.append({"profile": profile, "value": value, "size": size, "rule": rule, "limit": limit})
            if count:
                tallies.append((rule, "deny" if blocked == i else "allow"))
    body: dict[str, Any] = {"decision": "allow" if admitted else "deny"}
    if blocked is not None:
        entry = plan[blocked]
        rule_ = ruleset.by_name.get(entry.rule)
        body["code"] = rule_.code if rule_ else DEFAULT_CODE
        body["reason"] = rule_.reason if rule_ else DEFAULT_REASON
        body["rule"] = entry.rule
    elif res.rate_blocked is not None:
        rentry = rates[res.rate_blocked]
        rule_ = ruleset.by_name.get(rentry.rule)
        body["code"] = rule_.rate_code if rule_ else RATE_CODE
        body["reason"] = rule_.rate_reason if rule_ else RATE_REASON
        body["rule"] = rentry.rule
        body["rate"] = rate_json(rentry)
    if res.duplicate:
        body["duplicate"] = True
    body["profiles"] = profiles
    if rates:
        body["rates"] = _rates(res, rates, shadow, tallies if count else None)
    body["shadow"] = shadow
    return Decision(body, tallies)


def _rates(res: ReserveResult, rates: Sequence[RateEntry], shadow: list[dict[str, Any]],
           tallies: list[tuple[str, str]] | None) -> list[dict[str, Any]]:
    """Each rate with the tokens its bucket held (when the store read it); shadow would-denies
    and tallies on the way."""
    tokens = res.tokens
    out = []
    for j, entry in enumerate(rates):
        item = rate_json(entry)
        if entry.shadow:
            item["shadow"] = True
        if tokens:
            t = tokens[j]
            item["tokens"] = round(t, 3)
            if entry.shadow:
                if t < 1.0:
                    shadow.append(rate_json(entry))
                    if tallies is not None:
                        _tally(tallies, entry.rule, "would_deny")
                elif tallies is not None:
                    _tally(tallies, entry.rule, "allow")
            elif tallies is not None:
                _tally(tallies, entry.rule, "deny" if res.rate_blocked == j else "allow")
        out.append(item)
    return out


def limiting(res: ReserveResult, plan: Sequence[PlanEntry]) -> dict[str, Any] | None:
    """The limit that refused the call, as the decision log shows it."""
    if res.blocked is None:
        return None
    e = plan[res.blocked]
    return {"profile": e.profile, "value": e.value, "size": res.sizes[res.blocked], "limit": e.limit}


def rate_limiting(res: ReserveResult, rates: Sequence[RateEntry]) -> dict[str, Any] | None:
    """The rate that refused the call, as the decision log shows it (with the bucket's tokens)."""
    if res.rate_blocked is None:
        return None
    out = rate_json(rates[res.rate_blocked])
    if res.tokens:
        out["tokens"] = round(res.tokens[res.rate_blocked], 3)
    return out


def store_down(plan: Sequence[PlanEntry], ruleset: Ruleset, error: str,
               rates: Sequence[RateEntry] = ()) -> Decision:
    """The answer when the store cannot be asked: denied (503) if any enforced limit or rate
    the call meets says `on_store_error = "deny"`, else allowed uncounted."""
    denier = None
    for entry in plan:
        rule = ruleset.by_name.get(entry.rule)
        if entry.limit is not None and not entry.shadow and rule and rule.on_store_error == "deny":
            denier = entry.rule
            break
    if denier is None:
        for rentry in rates:
            rule = ruleset.by_name.get(rentry.rule)
            if not rentry.shadow and rule and rule.on_store_error == "deny":
                denier = rentry.rule
                break
    body: dict[str, Any] = {"decision": "deny" if denier else "allow", "store_error": error,
                            "profiles": [], "shadow": []}
    if denier:
        body.update(code=STORE_DOWN_CODE, reason=STORE_DOWN_REASON, rule=denier)
    return Decision(body, [(denier or "-", "store_" + body["decision"])])


def dry_run(res: ReserveResult, plan: Sequence[PlanEntry], ruleset: Ruleset, outcomes: Sequence[Any],
            attrs: dict[str, str], rates: Sequence[RateEntry] = ()) -> dict[str, Any]:
    """A dry run's reply: the decision it would be, and why each rule matched or not. Rates are
    listed (the rates the call meets) but their buckets are not read: a dry run takes no token
    and does not say whether one is there."""
    body = decide(res, plan, ruleset, count=False, rates=rates).body
    body["dry_run"] = True
    body["attrs"] = attrs
    body["explain"] = [o.as_dict(plan, rates) for o in outcomes]  # rule, matched, why, entries, rates, caps
    return body
