"""The reference interpreter: walks the compiled rules, and explains every step when asked.

Slower than the generated evaluator and written to be obviously right: the tests hold the
generated evaluator to it. With `explain=True` each rule gets a `RuleOutcome` saying whether
it matched, which condition failed, and how each limit's cap (and the rate) was chosen.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from policy.plan import PlanEntry, RateEntry
from policy.rules.model import NO_RATES, Evaluation, Limit, Rate, Rule, RuleOutcome, parse_count
from policy.rules.schedule import HOURS, WEEKDAYS, Moment

if TYPE_CHECKING:
    from policy.rules.model import Ruleset


def resolve_cap(lim: Limit, value: str | None, req: dict[str, str], moment: Moment) -> tuple[int, str]:
    """The cap a limit gives this call, and why (first that applies: the request's count within
    the ceiling, the override for the value, the first schedule window the time is in, max)."""
    note = ""
    if lim.max_from is not None:
        raw = req.get(lim.max_from)
        count = parse_count(raw)
        assert lim.ceiling is not None
        if count is not None:
            if count > lim.ceiling:
                return lim.ceiling, f"{lim.max_from} = {raw!r}, over the ceiling {lim.ceiling}"
            return count, f"{lim.max_from} = {raw!r}, within the ceiling {lim.ceiling}"
        note = f"{lim.max_from} missing; " if not raw else f"{lim.max_from} = {raw!r} is not a count; "
    if value is not None and value in lim.overrides:
        where = next((label for label, vals in lim.sources if value in vals), "overrides")
        return lim.overrides[value], f"{note}override for {value!r} in {where}"
    for window, cap in lim.schedule:
        if moment.inside(window):
            return cap, f"{note}schedule {window.desc}, local time {moment.describe(window.tz, window.zone)}"
    if lim.schedule:
        w = lim.schedule[0][0]
        return lim.max, f"{note}max: outside every schedule window, local time {moment.describe(w.tz, w.zone)}"
    return lim.max, f"{note}max"


def resolve_rate(rate: Rate, moment: Moment) -> tuple[int, int, str]:
    """The max and burst a rate gives this call, and why (the first schedule window the time
    is in, else the rate's own)."""
    for window, max_, burst in rate.schedule:
        if moment.inside(window):
            return max_, burst, f"schedule {window.desc}, local time {moment.describe(window.tz, window.zone)}"
    if rate.schedule:
        w = rate.schedule[0][0]
        return rate.max, rate.burst, f"max: outside every schedule window, local time {moment.describe(w.tz, w.zone)}"
    return rate.max, rate.burst, "max"


def _local_times(rule: Rule, moment: Moment) -> str:
    zones = {w.tz: w.zone for w in rule.schedule}
    return " [local time " + ", ".join(moment.describe(tz, zone) for tz, zone in zones.items()) + "]"


def interpret(rs: Ruleset, req: dict[str, str], explain: bool = False, now: float | None = None) -> Evaluation:
    """Evaluate `req` (adding derived attributes to it) by walking the rules."""
    moment = Moment(now)
    attrs: dict[str, str] = {}
    if rs.time_fields:
        dt = moment.local(rs.tz, rs.zone)
        for name, tval in (("hour", HOURS[dt.hour]), ("weekday", WEEKDAYS[dt.weekday()]),
                           ("time", f"{dt.hour:02d}:{dt.minute:02d}")):
            req[name] = tval
            attrs[name] = tval
    for cl in rs.classifiers:
        src = req.get(cl.field, "")
        val = cl.default
        for rx, out in cl.cases:
            if rx.search(src) is not None:
                val = out
                break
        if val is not None:
            req[cl.attr] = val
            attrs[cl.attr] = val
    plan: list[PlanEntry] = []
    rates: list[RateEntry] = []
    outcomes: list[RuleOutcome] = []
    for rule in rs.rules:
        failed = next((c for c in rule.conds if not c.test(req, moment)), None)
        if failed is not None:
            if explain:
                why = f"not matched: {failed.desc}"
                if rule.schedule:
                    why += _local_times(rule, moment)
                outcomes.append(RuleOutcome(rule.name, False, why))
            continue
        start = len(plan)
        missing: str | None = None
        caps: list[str] = []
        for step in rule.steps:
            if step.static is not None:
                plan.append(step.static)
                if step.limit is not None:
                    caps.append(f"{step.profile}: {step.limit.max} (max)")
                continue
            value = None
            if step.template is not None:
                value = step.template.render(req)
                if value is None:
                    missing = step.template.source
                    break
            cap = None
            if step.limit is not None:
                cap, why = resolve_cap(step.limit, value, req, moment)
                key = step.profile if value is None else f"{step.profile}={value}"
                caps.append(f"{key}: {cap} ({why})")
            plan.append(PlanEntry(step.profile, value, cap, step.shadow, rule.name))
        rate_at = len(rates)
        rstep = rule.rate_step
        if missing is None and rstep is not None:
            rvalue = None
            if rstep.template is not None:
                rvalue = rstep.template.render(req)
                if rvalue is None:
                    missing = rstep.template.source
            if missing is None:
                max_, burst, why = resolve_rate(rstep.rate, moment)
                rates.append(RateEntry(rule.name, rvalue, rstep.rate.per_second(max_), burst, rstep.shadow))
                key = "" if rvalue is None else f" {rvalue}"
                caps.append(f"rate{key}: {rstep.rate.describe(max_, burst)} ({why})")
        if missing is not None:
            del plan[start:]
            if explain:
                outcomes.append(RuleOutcome(rule.name, False, f"skipped: template {missing!r} has an empty field"))
            continue
        if explain:
            why = "matched: " + (" and ".join(c.desc for c in rule.conds) if rule.conds else "no conditions")
            if rule.schedule:
                why += _local_times(rule, moment)
            if rule.final:
                why += " (final: later rules skipped)"
            outcomes.append(RuleOutcome(rule.name, True, why, list(range(start, len(plan))), caps,
                                        list(range(rate_at, len(rates)))))
        if rule.final:
            break
    found: Sequence[RateEntry] = rates if rs.uses_rates else NO_RATES
    return Evaluation(plan, outcomes, attrs, found)
