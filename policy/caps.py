"""What the rules say each profile key may hold now: one cap per profile and per override value. Pure.

The metrics (`callpolicy_profile_limit`, `callpolicy_profile_value_limit`), `callpolicy top`
(the values nearest their limits) and the reload preview (`policy.preview`: the keys over
their new caps) all read the caps from here.

A key's cap is the smallest any limiting rule gives it, from the enforced rules (the shadow
ones only when no enforced rule limits the profile). Each rule's cap is chosen the way a
call meets it (`policy.rules.interp.resolve_cap`): the override for the value, else the
`max` of the limit's schedule window the time `now` is in, else `max`. What is not known
without a call is left out, and said so:

- a rule's conditions are not looked at (the cap is the one a call matching the rule meets);
  a rule whose own `schedule` does not hold at `now` is not in force and gives no cap;
- a limit with `max_from` takes each call's cap from a request field: the cap here is the one
  a call without that field meets (override, schedule or `max`), and `per_call` names the field.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace

from policy.rules import Limit, Rule, Ruleset
from policy.rules.interp import resolve_cap
from policy.rules.schedule import Moment


@dataclass(frozen=True, slots=True)
class Cap:
    """One key's cap and where it comes from."""

    limit: int
    rule: str
    how: str  # "max", "override for 'acme' in ...", "schedule mon-fri 08:00-18:00 (UTC), ..."
    shadow: bool = False
    per_call: str | None = None  # the request field (max_from) that may give each call another cap

    def describe(self) -> str:
        """'rule account-cap: max' (+ the per-call note), for tables and logs."""
        text = f"rule {self.rule}{' (shadow: logs, never refuses)' if self.shadow else ''}: {self.how}"
        if self.per_call:
            text += f"; calls that carry {self.per_call} may have another cap"
        return text


@dataclass
class ProfileCaps:
    """The caps of one profile's keys: `cap` for a no-value profile or a value without an
    override, `values` for the values some limiting rule overrides."""

    profile: str
    cap: Cap | None = None
    values: dict[str, Cap] = field(default_factory=dict)

    @property
    def default(self) -> int | None:
        """The cap of the profile (no value), or of a value without an override."""
        return self.cap.limit if self.cap is not None else None

    @property
    def shadow(self) -> bool:
        """True when only shadow rules limit the profile."""
        cap = self.cap or next(iter(self.values.values()), None)
        return cap.shadow if cap is not None else False

    @property
    def overrides(self) -> dict[str, int]:
        """value -> cap of the overridden values."""
        return {v: c.limit for v, c in self.values.items()}

    def cap_for(self, value: str | None) -> Cap | None:
        """The cap of one key (value None: the whole no-value profile)."""
        if value is not None:
            found = self.values.get(value)
            if found is not None:
                return found
        return self.cap

    def limit_for(self, value: str | None) -> int | None:
        """The cap of one key as a number."""
        cap = self.cap_for(value)
        return cap.limit if cap is not None else None


def _rule_cap(rule: Rule, lim: Limit, value: str | None, moment: Moment) -> Cap:
    # a call without the max_from field meets the override, the schedule or max: that cap
    plain = replace(lim, max_from=None) if lim.max_from is not None else lim
    limit, how = resolve_cap(plain, value, {}, moment)
    return Cap(limit, rule.name, how, rule.shadow, lim.max_from)


def _in_force(rule: Rule, moment: Moment) -> bool:
    return not rule.schedule or any(moment.inside(w) for w in rule.schedule)


def _smallest(caps: Iterable[Cap]) -> Cap | None:
    best: Cap | None = None
    for cap in caps:
        if best is None or cap.limit < best.limit:
            best = cap
    return best


def profile_caps(ruleset: Ruleset, now: float | None = None) -> dict[str, ProfileCaps]:
    """Per limited profile: its caps at `now` (epoch seconds; None: the wall clock)."""
    moment = Moment(now)
    enforced: dict[str, list[tuple[Rule, Limit]]] = {}
    shadow: dict[str, list[tuple[Rule, Limit]]] = {}
    for rule in ruleset.rules:
        lim = rule.limit
        if lim is None or not _in_force(rule, moment):
            continue
        (shadow if rule.shadow else enforced).setdefault(lim.profile, []).append((rule, lim))
    out: dict[str, ProfileCaps] = {}
    for profile in sorted(set(enforced) | set(shadow)):
        group = enforced.get(profile) or shadow[profile]
        pc = ProfileCaps(profile, _smallest(_rule_cap(r, lim, None, moment) for r, lim in group))
        names = {v for _r, lim in group for v in lim.overrides}
        for v in sorted(names):
            found = _smallest(_rule_cap(r, lim, v, moment) for r, lim in group)
            if found is not None:
                pc.values[v] = found
        out[profile] = pc
    return out
