"""The compiled rules: what the compiler builds and the evaluators read. Immutable.

A `Ruleset` is built whole by the compiler; a reload builds a new one and swaps it in.
`Ruleset.evaluate` runs the generated straight-line evaluator (`codegen`); with
`explain=True`, and in `interpret`/`explain`, the reference interpreter (`interp`) runs.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, tzinfo
from typing import Any

from policy.plan import PlanEntry, RateEntry
from policy.rules.conditions import Cond, Request
from policy.rules.schedule import DEFAULT_TZ, Window

FastEvaluator = Callable[[dict[str, str], "float | None"],
                         tuple[list[PlanEntry], "Sequence[RateEntry]", dict[str, str]]]
#: The rates of a plan that meets none (shared: no list is built when no rule has a rate).
NO_RATES: tuple[RateEntry, ...] = ()
#: What a rule answers when its rate refuses a call, unless its `deny` says otherwise.
RATE_CODE = 503
RATE_REASON = "Call rate exceeded"


@dataclass(frozen=True, slots=True)
class Template:
    """A value template such as `{from_user}@{from_domain}`."""

    source: str
    parts: tuple[tuple[str, str | None], ...]  # (literal, field or None)
    fields: tuple[str, ...]

    def render(self, req: Request) -> str | None:
        """The value for this request, or None when a field it uses is missing or empty."""
        parts = self.parts
        if len(parts) == 1 and not parts[0][0]:
            return req.get(parts[0][1]) or None  # type: ignore[arg-type]  # "{account}": one lookup
        out = []
        for literal, name in parts:
            out.append(literal)
            if name is not None:
                val = req.get(name)
                if not val:
                    return None
                out.append(val)
        return "".join(out)


@dataclass(frozen=True, slots=True)
class Join:
    """A profile a matching rule joins, with its value template for with-value profiles."""

    profile: str
    value: Template | None


@dataclass(frozen=True, slots=True)
class Limit:
    """A cap on a profile key.

    The cap for a call is, first that applies: the count in the request field `max_from`
    (bounded by `ceiling`); the override for the rendered value (`overrides`, merged from
    inline tables, `[overrides.RULE]` and `overrides_file`); the `max` of the first
    `schedule` window the time is in; `max`.
    """

    profile: str
    value: Template | None
    max: int
    overrides: Mapping[str, int]
    schedule: tuple[tuple[Window, int], ...] = ()
    max_from: str | None = None
    ceiling: int | None = None
    #: where the overrides came from, in order: (label, values), for explanations
    sources: tuple[tuple[str, Mapping[str, int]], ...] = ()

    @property
    def constant(self) -> bool:
        """True when every call meets the same cap (no schedule, request field or override)."""
        return not self.schedule and self.max_from is None and not self.overrides


@dataclass(frozen=True, slots=True)
class Rate:
    """A call rate: at most `max` new calls every `per` seconds, with bursts of `burst`.

    A token bucket per rendered value (one per rule without `value`): `burst` tokens at most,
    refilled at `max / per` a second. Inside the first `schedule` window the time is in, that
    window's `max` and `burst` apply instead.
    """

    value: Template | None
    max: int
    per: float
    burst: int
    schedule: tuple[tuple[Window, int, int], ...] = ()  # (window, max, burst)

    @property
    def constant(self) -> bool:
        """True when every call meets the same rate (no schedule)."""
        return not self.schedule

    def per_second(self, max_: int) -> float:
        """Tokens a second for a `max` (the rule's or a window's)."""
        return max_ / self.per

    def describe(self, max_: int, burst: int) -> str:
        """`10 per 1 s, burst 20`."""
        return f"{max_} per {self.per:g} s, burst {burst}"


def parse_count(raw: str | None) -> int | None:
    """A request field as a count of calls: ASCII digits only, else None (missing or bad)."""
    if not raw or not raw.isdigit() or not raw.isascii():
        return None
    return int(raw) if len(raw) <= 18 else 10**18


@dataclass(frozen=True, slots=True)
class Step:
    """One plan entry a matching rule adds: prebuilt when it is the same for every call."""

    profile: str
    template: Template | None
    limit: Limit | None
    shadow: bool
    static: PlanEntry | None

    @classmethod
    def make(cls, profile: str, template: Template | None, limit: Limit | None, shadow: bool, rule: str) -> Step:
        """Build a step; a no-value profile with a constant cap gives the same entry every call."""
        static = None
        if template is None and (limit is None or limit.constant):
            static = PlanEntry(profile, None, None if limit is None else limit.max, shadow, rule)
        return cls(profile, template, limit, shadow, static)


@dataclass(frozen=True, slots=True)
class RateStep:
    """The rate entry a matching rule adds: prebuilt when it is the same for every call."""

    template: Template | None
    rate: Rate
    shadow: bool
    static: RateEntry | None

    @classmethod
    def make(cls, rate: Rate, shadow: bool, rule: str) -> RateStep:
        """Build a step; a rate without value and without schedule gives the same entry every call."""
        static = None
        if rate.value is None and rate.constant:
            static = RateEntry(rule, None, rate.per_second(rate.max), rate.burst, shadow)
        return cls(rate.value, rate, shadow, static)


@dataclass(frozen=True, slots=True)
class Rule:
    """A compiled rule."""

    name: str
    file: str
    conds: tuple[Cond, ...]
    joins: tuple[Join, ...]
    limit: Limit | None
    code: int
    reason: str
    final: bool
    shadow: bool
    on_store_error: str
    description: str = ""
    steps: tuple[Step, ...] = ()
    schedule: tuple[Window, ...] = ()  # the rule applies only inside one of these (its last condition)
    rate: Rate | None = None
    rate_code: int = RATE_CODE  # the answer when the rate refuses (`deny`, else 503)
    rate_reason: str = RATE_REASON
    rate_step: RateStep | None = None

    def with_steps(self) -> Rule:
        """This rule with its precomputed plan steps (joins first, then the limit; the rate apart)."""
        steps = [Step.make(j.profile, j.value, None, False, self.name) for j in self.joins]
        if self.limit is not None:
            lim = self.limit
            steps.append(Step.make(lim.profile, lim.value, lim, self.shadow, self.name))
        rate_step = None if self.rate is None else RateStep.make(self.rate, self.shadow, self.name)
        return replace(self, steps=tuple(steps), rate_step=rate_step)


@dataclass(frozen=True, slots=True)
class Classifier:
    """Derives `attr` from `field`: the first case whose regex matches, else the default."""

    attr: str
    field: str
    file: str
    cases: tuple[tuple[re.Pattern[str], str], ...]  # (regex, value)
    default: str | None

    @property
    def values(self) -> tuple[str, ...]:
        """Every value it can give, in order (cases, then the default)."""
        out = [v for _, v in self.cases]
        if self.default is not None:
            out.append(self.default)
        return tuple(dict.fromkeys(out))


@dataclass(slots=True)
class RuleOutcome:
    """What one rule did for one request (for `--dry-run` explanations)."""

    rule: str
    matched: bool
    why: str
    entries: list[int] = field(default_factory=list)  # indexes into the plan
    caps: list[str] = field(default_factory=list)  # how each limit's cap (and the rate) was chosen
    rates: list[int] = field(default_factory=list)  # indexes into the rates

    def as_dict(self, plan: Sequence[PlanEntry], rates: Sequence[RateEntry] = ()) -> dict[str, Any]:
        """JSON-able: rule, matched, why, entries (profile, value, limit), rates (value, rate,
        burst) and caps."""
        out: dict[str, Any] = {
            "rule": self.rule, "matched": self.matched, "why": self.why,
            "entries": [{"profile": plan[i].profile, "value": plan[i].value, "limit": plan[i].limit}
                        for i in self.entries],
        }
        if self.rates:
            out["rates"] = [{"value": rates[i].value, "rate": rates[i].rate, "burst": rates[i].burst}
                            for i in self.rates]
        if self.caps:
            out["caps"] = list(self.caps)
        return out


@dataclass(slots=True)
class Evaluation:
    """The plan for one call: which keys it joins, which limits it meets, which rates."""

    plan: list[PlanEntry]
    outcomes: list[RuleOutcome]
    attrs: dict[str, str]
    rates: Sequence[RateEntry] = NO_RATES

    def explanation(self) -> list[dict[str, Any]]:
        """The outcomes as a JSON-able list (empty unless evaluated with `explain=True`)."""
        return [o.as_dict(self.plan, self.rates) for o in self.outcomes]


def _no_rules(r: dict[str, str], now: float | None) -> tuple[list[PlanEntry], Sequence[RateEntry], dict[str, str]]:
    return [], NO_RATES, {}


@dataclass(frozen=True)
class Ruleset:
    """Compiled, immutable rules."""

    no_value: frozenset[str]
    with_value: frozenset[str]
    classifiers: tuple[Classifier, ...]
    rules: tuple[Rule, ...]
    files: tuple[str, ...]
    version: str
    by_name: Mapping[str, Rule] = field(default_factory=dict)
    #: the zone of the time fields (hour, weekday, time) and of schedules without `tz`
    tz: str = DEFAULT_TZ
    zone: tzinfo = field(default=UTC, repr=False, compare=False)
    #: whether a rule reads the time fields (they are computed only then)
    time_fields: bool = False
    #: the data files (overrides files) the rules read, after `files`
    data_files: tuple[str, ...] = ()
    source: str = field(default="", repr=False, compare=False)
    _fast: FastEvaluator = field(default=_no_rules, repr=False, compare=False)

    @property
    def profiles(self) -> frozenset[str]:
        """Every declared profile."""
        return self.no_value | self.with_value

    @property
    def uses_time(self) -> bool:
        """Whether evaluations depend on the time (time fields or schedules)."""
        return self.time_fields or any(r.schedule or (r.limit is not None and bool(r.limit.schedule))
                                       or (r.rate is not None and bool(r.rate.schedule)) for r in self.rules)

    @property
    def uses_rates(self) -> bool:
        """Whether some rule has a call rate (plans then carry rates)."""
        return any(r.rate is not None for r in self.rules)

    def __post_init__(self) -> None:
        from policy.rules.codegen import generate

        source, consts = generate(self)
        namespace = dict(consts)
        exec(compile(source, f"<rules {self.version}>", "exec"), namespace)
        object.__setattr__(self, "source", source)
        object.__setattr__(self, "_fast", namespace["evaluate"])

    def evaluate(self, req: dict[str, str], explain: bool = False, now: float | None = None) -> Evaluation:
        """Classify the request (adds derived attributes to `req`) and build its plan.

        `now` is the time of the call in epoch seconds (the service's clock); None reads the
        wall clock, and only when the rules use the time. `explain=True` runs the interpreter
        and fills `outcomes`.
        """
        if not explain:
            plan, rates, attrs = self._fast(req, now)
            return Evaluation(plan, [], attrs, rates)
        return self.interpret(req, explain=True, now=now)

    def interpret(self, req: dict[str, str], explain: bool = False, now: float | None = None) -> Evaluation:
        """The reference evaluator (walks the compiled rules; explains when asked)."""
        from policy.rules.interp import interpret

        return interpret(self, req, explain, now)

    def explain(self, req: Mapping[str, str], now: float | None = None) -> list[dict[str, Any]]:
        """Every rule, whether it matched and why, and how each cap was chosen, as a JSON-able
        list (for a debug log line or a dry run). Leaves `req` untouched."""
        return self.interpret(dict(req), explain=True, now=now).explanation()
