"""The rule compiler: TOML text -> a `Ruleset`. Every load error is a `RuleError` naming the
file, the rule (or classifier) and the key; nothing else escapes `compile_sources`.

Rule files (every `*.toml` of the rules directory, read in name order) hold:

- `[time]`: `tz`, the zone of the time fields and of schedules without their own (once).
- `[profiles]`: `no_value = [...]` and `with_value = [...]` (Kamailio's dialog profiles).
- `[[classify]]`: derive an attribute from a field by regular expressions, first match
  wins, with a default. Later classifiers and every later rule can use the attribute.
- `[[rule]]`: `name`, optional `match`, `schedule`, `join`, `limit` (with `overrides`,
  `overrides_file`, `schedule`, `max_from`/`ceiling`), `rate` (`value`, `max`, `per`,
  `burst`, `schedule`), `deny`, `final`, `shadow`, `on_store_error`, `description`. Rules
  run in file order.
- `[overrides.RULE]`: per-value maxima for RULE's limit (e.g. `acme = 3`), so thousands
  of account caps can live in a file of their own.

The reference of every key and error is docs/rules.md. Pure but for overrides files, which
are read through the `read` callback given to `compile_sources` (by default from disk).
"""

from __future__ import annotations

import hashlib
import math
import re
import string
import tomllib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from policy.errors import RuleError
from policy.rules.conditions import (
    COMBINATORS,
    OPERATORS,
    BadArg,
    Cond,
    all_of,
    in_schedule,
    parse_regex,
    type_name,
)
from policy.rules.fields import ATTR_NAME_RE, BUILTIN_FIELDS, TIME_FIELDS, is_attr_field
from policy.rules.model import RATE_CODE, RATE_REASON, Classifier, Join, Limit, Rate, Rule, Ruleset, Template
from policy.rules.overrides import DataError, parse_overrides
from policy.rules.schedule import DAY, DEFAULT_TZ, HOURS, TIMES, WEEKDAYS, Moment, Window, get_tz

_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:-]*$")
#: How deep all/any/not may nest (the generated code stays far from Python's parser limits).
MAX_DEPTH = 16


@dataclass(frozen=True, slots=True)
class Domain:
    """The values a field can take, when they are known in advance (a classify attribute)."""

    values: frozenset[str]
    listing: str  # for messages: "emergency, international, domestic, local"
    always: bool  # False: the field may also be absent

    @classmethod
    def of(cls, values: Sequence[str], always: bool) -> Domain:
        return cls(frozenset(values), ", ".join(values), always)


_PROBE_TIME = Moment(0.0)
_TIME_DOMAINS = {
    "hour": Domain(frozenset(HOURS), "00 to 23", True),
    "weekday": Domain.of(WEEKDAYS, True),
    "time": Domain(frozenset(TIMES), "HH:MM, 00:00 to 23:59", True),
}
_RANGE_RE = re.compile(r"^([0-9]{2}):([0-9]{2})-([0-9]{2}):([0-9]{2})$")
#: The longest `rate.per`: a day.
MAX_PER = 86_400.0
#: The largest `rate.max` and `rate.burst` (far beyond any call rate; keeps the arithmetic exact).
MAX_RATE = 1_000_000


def parse_days(arg: Any) -> frozenset[int]:
    """`"mon-fri"`, `["mon", "wed-thu"]`, `"sat-mon"` (ranges may wrap) -> weekday numbers."""
    items = [arg] if isinstance(arg, str) else arg
    if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
        raise BadArg(f"must be a day, a range of days or an array of them, not {type_name(arg)}")
    if not items:
        raise BadArg("must not be empty")
    days: set[int] = set()
    for item in items:
        first, dash, last = item.partition("-")
        for name in (first, last) if dash else (first,):
            if name not in WEEKDAYS:
                raise BadArg(f"{name!r} is not a day ({', '.join(WEEKDAYS)}; ranges like 'mon-fri')")
        a, b = WEEKDAYS.index(first), WEEKDAYS.index(last if dash else first)
        days.update(d % 7 for d in range(a, (b if b >= a else b + 7) + 1))
    return frozenset(days)


def parse_hours(arg: Any) -> tuple[tuple[int, int], ...]:
    """`"08:00-18:00"`, `["08:00-12:00", "22:00-06:00"]` -> (start, end) minutes of the day."""
    items = [arg] if isinstance(arg, str) else arg
    if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
        raise BadArg(f"must be a range \"HH:MM-HH:MM\" or an array of them, not {type_name(arg)}")
    if not items:
        raise BadArg("must not be empty")
    out = []
    for item in items:
        m = _RANGE_RE.match(item)
        if m is None:
            raise BadArg(f"{item!r} is not a range of hours like '08:00-18:00'")
        h1, m1, h2, m2 = (int(g) for g in m.groups())
        if h1 > 23 or m1 > 59:
            raise BadArg(f"{item!r}: {h1:02d}:{m1:02d} is not a time of day (00:00 to 23:59)")
        if h2 > 24 or m2 > 59 or (h2 == 24 and m2):
            raise BadArg(f"{item!r}: {h2:02d}:{m2:02d} is not a time of day (00:00 to 24:00)")
        start, end = h1 * 60 + m1, h2 * 60 + m2
        if start == end:
            raise BadArg(f"{item!r} is empty (for the whole day leave hours out, or write '00:00-24:00')")
        out.append((start, end))
    return tuple(out)


class _Ctx:
    """Error context while compiling one section."""

    def __init__(self, file: str, name: str | None, kind: str = "rule") -> None:
        self.file = file
        self.name = name
        self.kind = kind

    def error(self, key: str | None, message: str) -> RuleError:
        return RuleError(self.file, self.name, key, message, self.kind)


def _expect(ctx: _Ctx, key: str, value: Any, kind: type | tuple[type, ...], what: str) -> Any:
    if (isinstance(value, bool) and kind is int) or not isinstance(value, kind):
        raise ctx.error(key, f"must be {what}, not {type_name(value)}")
    return value


def _check_keys(ctx: _Ctx, prefix: str, table: Mapping[str, Any], allowed: Iterable[str]) -> None:
    allowed = tuple(allowed)
    for key in table:
        if key not in allowed:
            raise ctx.error(f"{prefix}{key}", f"unknown key (expected one of: {', '.join(sorted(allowed))})")


Reader = Callable[[str], str]


def read_data_file(path: str) -> str:
    """The default reader of overrides files: a regular file's UTF-8 text."""
    p = Path(path)
    if not p.is_file():
        raise OSError("no such regular file")
    return p.read_text(encoding="utf-8")


class _Compiler:
    def __init__(self, read: Reader = read_data_file) -> None:
        self.read = read
        self.sources: set[Path] = set()  # the rule files (an overrides file must not be one)
        self.data: dict[str, tuple[str, str, dict[str, tuple[int, int]] | None]] = {}  # path -> (ref, text, parsed)
        self.no_value: set[str] = set()
        self.with_value: set[str] = set()
        self.profile_file: dict[str, str] = {}
        self.fields: set[str] = {*BUILTIN_FIELDS, *TIME_FIELDS}
        self.domains: dict[str, Domain] = dict(_TIME_DOMAINS)
        self.tz = DEFAULT_TZ
        self.tz_file: str | None = None
        self.time_fields = False  # a rule or classifier reads hour/weekday/time
        self.classifiers: list[Classifier] = []
        self.rule_file: dict[str, str] = {}
        self.raw_rules: list[tuple[_Ctx, dict[str, Any], frozenset[str]]] = []
        self.overrides: dict[str, dict[str, tuple[int, str]]] = {}
        self.override_where: list[tuple[str, str]] = []  # (file, rule) for validation

    # fields -----------------------------------------------------------------------------

    def known(self, name: str) -> bool:
        if name in TIME_FIELDS:
            self.time_fields = True
        return name in self.fields or is_attr_field(name)

    def known_list(self) -> str:
        return f"known: {', '.join(sorted(self.fields))}, attrs.NAME"

    def field_name(self, ctx: _Ctx, key: str, name: str) -> str:
        if not self.known(name):
            raise ctx.error(key, f"unknown field {name!r} ({self.known_list()})")
        return name

    def template(self, ctx: _Ctx, key: str, src: Any) -> Template:
        _expect(ctx, key, src, str, "a string")
        parts: list[tuple[str, str | None]] = []
        fields: list[str] = []
        try:
            parsed = list(string.Formatter().parse(src))
        except ValueError as exc:
            raise ctx.error(key, f"bad template {src!r}: {exc}") from None
        for literal, name, spec, conv in parsed:
            if name is None:
                parts.append((literal, None))
                continue
            if spec or conv:
                raise ctx.error(key, f"template {src!r}: format specs are not supported")
            if name == "":
                raise ctx.error(key, f"template {src!r}: empty field name")
            if not self.known(name):
                raise ctx.error(key, f"template {src!r} uses unknown field {name!r} ({self.known_list()})")
            parts.append((literal, name))
            fields.append(name)
        return Template(src, tuple(parts), tuple(fields))

    # sections -----------------------------------------------------------------------------

    def file(self, file: str, text: str) -> None:
        top = _Ctx(file, None)
        try:
            doc = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise top.error(None, f"invalid TOML: {exc}") from None
        except RecursionError:
            raise top.error(None, "invalid TOML: nested too deep") from None
        _check_keys(top, "", doc, ("profiles", "classify", "rule", "overrides", "time"))
        if "time" in doc:
            self.time_table(top, doc["time"])
        if "profiles" in doc:
            self.profiles(top, doc["profiles"])
        for i, raw in enumerate(_expect(top, "classify", doc.get("classify", []), list, "an array of tables")):
            self.classify(file, i, raw)
        for i, raw in enumerate(_expect(top, "rule", doc.get("rule", []), list, "an array of tables")):
            self.rule_header(file, i, raw)
        if "overrides" in doc:
            self.overrides_table(top, doc["overrides"])

    def time_table(self, ctx: _Ctx, raw: Any) -> None:
        _expect(ctx, "time", raw, dict, "a table")
        _check_keys(ctx, "time.", raw, ("tz",))
        if "tz" not in raw:
            raise ctx.error("time.tz", "is required")
        if self.tz_file is not None:
            raise ctx.error("time.tz", f"the time zone is already set in {self.tz_file}")
        self.tz = self.zone_name(ctx, "time.tz", raw["tz"])
        self.tz_file = ctx.file

    def zone_name(self, ctx: _Ctx, key: str, raw: Any) -> str:
        name = _expect(ctx, key, raw, str, "a string")
        try:
            get_tz(name)
        except ValueError as exc:
            raise ctx.error(key, str(exc)) from None
        return str(name)

    def window(self, ctx: _Ctx, key: str, raw: Any, extra: tuple[str, ...] = ()) -> Window:
        """A schedule window: `{ days = ..., hours = ..., tz = ... }` (in the rules' zone by default)."""
        _expect(ctx, key, raw, dict, "a table")
        _check_keys(ctx, f"{key}.", raw, ("days", "hours", "tz", *extra))
        if "days" not in raw and "hours" not in raw:
            raise ctx.error(key, "needs days or hours (or both)")
        try:
            days = parse_days(raw["days"]) if "days" in raw else frozenset(range(7))
        except BadArg as exc:
            raise ctx.error(f"{key}.days", exc.message) from None
        try:
            ranges = parse_hours(raw["hours"]) if "hours" in raw else ((0, DAY),)
        except BadArg as exc:
            raise ctx.error(f"{key}.hours", exc.message) from None
        tz = self.zone_name(ctx, f"{key}.tz", raw["tz"]) if "tz" in raw else self.tz
        return Window.make(days, ranges, tz, get_tz(tz))

    def windows(self, ctx: _Ctx, key: str, raw: Any, extra: tuple[str, ...] = ()
                ) -> list[tuple[str, Window, dict[str, Any]]]:
        """A schedule: one window table or an array of them; (key, window, table) each."""
        tables = [(key, raw)] if isinstance(raw, dict) else [
            (f"{key}[{i}]", t) for i, t in enumerate(_expect(ctx, key, raw, list, "a table or an array of tables"))]
        if not tables:
            raise ctx.error(key, "is empty: give at least one window (days and/or hours)")
        return [(k, self.window(ctx, k, t, extra), t) for k, t in tables]

    def profiles(self, ctx: _Ctx, raw: Any) -> None:
        _expect(ctx, "profiles", raw, dict, "a table")
        _check_keys(ctx, "profiles.", raw, ("no_value", "with_value"))
        for kind in ("no_value", "with_value"):
            names = _expect(ctx, f"profiles.{kind}", raw.get(kind, []), list, "an array of strings")
            for name in names:
                _expect(ctx, f"profiles.{kind}", name, str, "an array of strings")
                if not _NAME_RE.match(name):
                    raise ctx.error(f"profiles.{kind}", f"bad profile name {name!r}")
                if name in self.profile_file:
                    raise ctx.error(
                        f"profiles.{kind}",
                        f"profile {name!r} is already declared in {self.profile_file[name]}",
                    )
                self.profile_file[name] = ctx.file
                (self.no_value if kind == "no_value" else self.with_value).add(name)

    def classify(self, file: str, index: int, raw: Any) -> None:
        label = raw.get("attr") if isinstance(raw, dict) and isinstance(raw.get("attr"), str) else f"#{index + 1}"
        ctx = _Ctx(file, label, "classify")
        _expect(ctx, "classify", raw, dict, "a table")
        _check_keys(ctx, "", raw, ("attr", "field", "cases", "default", "description"))
        for req in ("attr", "field", "cases"):
            if req not in raw:
                raise ctx.error(req, "is required")
        attr = _expect(ctx, "attr", raw["attr"], str, "a string")
        if not ATTR_NAME_RE.match(attr):
            raise ctx.error("attr", f"bad attribute name {attr!r}")
        if attr in self.fields:
            raise ctx.error("attr", f"{attr!r} is already a field")
        if attr in COMBINATORS:
            raise ctx.error("attr", f"{attr!r} is reserved (a match combinator)")
        src = self.field_name(ctx, "field", _expect(ctx, "field", raw["field"], str, "a string"))
        default = raw.get("default")
        if default is not None:
            _expect(ctx, "default", default, str, "a string")
        _expect(ctx, "description", raw.get("description", ""), str, "a string")
        cases: list[tuple[re.Pattern[str], str]] = []
        for i, case in enumerate(_expect(ctx, "cases", raw["cases"], list, "an array of tables")):
            key = f"cases[{i}]"
            _expect(ctx, key, case, dict, "a table")
            _check_keys(ctx, f"{key}.", case, ("value", "regex"))
            for req in ("value", "regex"):
                if req not in case:
                    raise ctx.error(f"{key}.{req}", "is required")
            value = _expect(ctx, f"{key}.value", case["value"], str, "a string")
            cases.append((self.regex(ctx, f"{key}.regex", case["regex"]), value))
        cl = Classifier(attr, src, file, tuple(cases), default)
        self.classifiers.append(cl)
        self.fields.add(attr)
        self.domains[attr] = Domain.of(cl.values, default is not None)

    def regex(self, ctx: _Ctx, key: str, src: Any) -> re.Pattern[str]:
        try:
            return parse_regex(src)
        except BadArg as exc:
            raise ctx.error(key, exc.message) from None

    def rule_header(self, file: str, index: int, raw: Any) -> None:
        name = raw.get("name") if isinstance(raw, dict) else None
        ctx = _Ctx(file, name if isinstance(name, str) else f"#{index + 1}")
        _expect(ctx, "rule", raw, dict, "a table")
        if "name" not in raw:
            raise ctx.error("name", "is required")
        _expect(ctx, "name", name, str, "a string")
        assert isinstance(name, str)
        if not _NAME_RE.match(name):
            raise ctx.error("name", f"bad rule name {name!r}")
        if name in self.rule_file:
            raise ctx.error("name", f"duplicate rule name (first defined in {self.rule_file[name]})")
        self.rule_file[name] = file
        # compiled once all files are read; fields of later classifiers are not visible to
        # earlier rules: snapshot the fields now
        self.raw_rules.append((ctx, raw, frozenset(self.fields)))

    def overrides_table(self, ctx: _Ctx, raw: Any) -> None:
        _expect(ctx, "overrides", raw, dict, "a table")
        for rule, values in raw.items():
            key = f"overrides.{rule}"
            _expect(ctx, key, values, dict, "a table of value = max")
            target = self.overrides.setdefault(rule, {})
            for value, cap in values.items():
                vkey = f"{key}.{value}"
                if isinstance(cap, bool) or not isinstance(cap, int):
                    raise ctx.error(vkey, f"must be an integer, not {type_name(cap)}")
                if cap < 0:
                    raise ctx.error(vkey, "must be >= 0")
                if value in target:
                    raise ctx.error(vkey, f"override already set in {target[value][1]}")
                target[value] = (cap, ctx.file)
            self.override_where.append((ctx.file, rule))

    def finish_rule(self, ctx: _Ctx, raw: dict[str, Any], fields: frozenset[str]) -> Rule:
        saved_fields = self.fields
        self.fields = set(fields)
        try:
            return self.rule(ctx, raw)
        finally:
            self.fields = saved_fields

    def rule(self, ctx: _Ctx, raw: dict[str, Any]) -> Rule:
        _check_keys(
            ctx,
            "",
            raw,
            ("name", "description", "match", "schedule", "join", "limit", "rate", "deny", "final", "shadow",
             "on_store_error"),
        )
        name = raw["name"]
        conds: tuple[Cond, ...] = ()
        if "match" in raw:
            conds = tuple(self.match_table(ctx, "match", raw["match"]))
        schedule: tuple[Window, ...] = ()
        if "schedule" in raw:
            schedule = tuple(w for _, w, _ in self.windows(ctx, "schedule", raw["schedule"]))
            conds = (*conds, in_schedule(schedule))
        joins: list[Join] = []
        for i, j in enumerate(_expect(ctx, "join", raw.get("join", []), list, "an array of tables")):
            key = f"join[{i}]"
            _expect(ctx, key, j, dict, "a table")
            _check_keys(ctx, f"{key}.", j, ("profile", "value"))
            profile, value = self.profile_ref(ctx, key, j)
            joins.append(Join(profile, value))
        limit = None
        if "limit" in raw:
            limit = self.limit(ctx, raw["limit"])
        rate = None
        if "rate" in raw:
            rate = self.rate(ctx, raw["rate"])
        code, reason = 486, "Call limit reached"
        rate_code, rate_reason = RATE_CODE, RATE_REASON
        if "deny" in raw:
            if limit is None and rate is None:
                raise ctx.error("deny", "needs a limit or a rate (a rule without either never denies)")
            deny = _expect(ctx, "deny", raw["deny"], dict, "a table")
            _check_keys(ctx, "deny.", deny, ("code", "reason"))
            if "code" in deny:
                code = _expect(ctx, "deny.code", deny["code"], int, "an integer")
                if not 400 <= code <= 699:
                    raise ctx.error("deny.code", f"must be a SIP final error code 400-699, not {code}")
            if "reason" in deny:
                reason = _expect(ctx, "deny.reason", deny["reason"], str, "a string")
                if not reason or "\n" in reason or "\r" in reason:
                    raise ctx.error("deny.reason", "must be one non-empty line")
            # an explicit deny answers for whatever the rule refuses with: its limit or its rate
            rate_code = code if "code" in deny else rate_code
            rate_reason = reason if "reason" in deny else rate_reason
        final = _expect(ctx, "final", raw.get("final", False), bool, "a boolean")
        shadow = _expect(ctx, "shadow", raw.get("shadow", False), bool, "a boolean")
        if shadow and limit is None and rate is None:
            raise ctx.error("shadow", "needs a limit or a rate (only limits and rates can be shadowed)")
        on_err = _expect(ctx, "on_store_error", raw.get("on_store_error", "deny"), str, "a string")
        if on_err not in ("allow", "deny"):
            raise ctx.error("on_store_error", f"must be 'allow' or 'deny', not {on_err!r}")
        if not joins and limit is None and rate is None and not final:
            raise ctx.error(None, "does nothing: give it a join, a limit, a rate or final = true")
        desc = _expect(ctx, "description", raw.get("description", ""), str, "a string")
        return Rule(
            name=name,
            file=ctx.file,
            conds=conds,
            joins=tuple(joins),
            limit=limit,
            code=code,
            reason=reason,
            final=final,
            shadow=shadow,
            on_store_error=on_err,
            description=desc,
            schedule=schedule,
            rate=rate,
            rate_code=rate_code,
            rate_reason=rate_reason,
        )

    def profile_ref(self, ctx: _Ctx, key: str, raw: Mapping[str, Any]) -> tuple[str, Template | None]:
        if "profile" not in raw:
            raise ctx.error(f"{key}.profile", "is required")
        profile = _expect(ctx, f"{key}.profile", raw["profile"], str, "a string")
        if profile in self.no_value:
            if "value" in raw:
                raise ctx.error(f"{key}.value", f"profile {profile!r} is declared without value: it takes no value")
            return profile, None
        if profile in self.with_value:
            if "value" not in raw:
                raise ctx.error(f"{key}.value", f"profile {profile!r} is declared with value: a value is required")
            return profile, self.template(ctx, f"{key}.value", raw["value"])
        raise ctx.error(f"{key}.profile", f"undefined profile {profile!r}")

    def limit(self, ctx: _Ctx, raw: Any) -> Limit:
        _expect(ctx, "limit", raw, dict, "a table")
        _check_keys(ctx, "limit.", raw, ("profile", "value", "max", "overrides", "overrides_file", "schedule",
                                         "max_from", "ceiling"))
        profile, value = self.profile_ref(ctx, "limit", raw)
        if "max" not in raw:
            raise ctx.error("limit.max", "is required")
        cap = self.count(ctx, "limit.max", raw["max"])
        schedule: list[tuple[Window, int]] = []
        if "schedule" in raw:
            for key, window, table in self.windows(ctx, "limit.schedule", raw["schedule"], ("max",)):
                if "max" not in table:
                    raise ctx.error(f"{key}.max", "is required (the cap inside this window)")
                schedule.append((window, self.count(ctx, f"{key}.max", table["max"])))
        overrides: dict[str, int] = {}
        sources: list[tuple[str, Mapping[str, int]]] = []
        if "overrides" in raw:
            if value is None:
                raise ctx.error("limit.overrides", f"profile {profile!r} has no values to override")
            for v, c in _expect(ctx, "limit.overrides", raw["overrides"], dict, "a table").items():
                overrides[v] = self.count(ctx, f"limit.overrides.{v}", c)
            sources.append(("limit.overrides", dict(overrides)))
        if "overrides_file" in raw:
            if value is None:
                raise ctx.error("limit.overrides_file", f"profile {profile!r} has no values to override")
            path, ref, data = self.overrides_file(ctx, raw["overrides_file"])
            for v, (c, line) in data.items():
                if v in overrides:
                    raise RuleError(f"{path}:{line}" if line else path, ctx.name, None,
                                    f"value {v!r} is also in the rule's limit.overrides ({ctx.file})")
                overrides[v] = c
            sources.append((ref, {v: c for v, (c, _) in data.items()}))
        max_from = ceiling = None
        if "max_from" in raw:
            name = _expect(ctx, "limit.max_from", raw["max_from"], str, "a string")
            max_from = self.field_name(ctx, "limit.max_from", name)
            if "ceiling" not in raw:
                raise ctx.error("limit.ceiling", "is required with max_from (the most a request may ask for)")
            ceiling = self.count(ctx, "limit.ceiling", raw["ceiling"])
        elif "ceiling" in raw:
            raise ctx.error("limit.ceiling", "bounds max_from: give max_from too, or leave ceiling out")
        return Limit(profile, value, cap, overrides, tuple(schedule), max_from, ceiling, tuple(sources))

    def rate(self, ctx: _Ctx, raw: Any) -> Rate:
        """`rate = { value = "{account}", max = 10, per = 1, burst = 20, schedule = [...] }`."""
        _expect(ctx, "rate", raw, dict, "a table")
        _check_keys(ctx, "rate.", raw, ("value", "max", "per", "burst", "schedule"))
        value = self.template(ctx, "rate.value", raw["value"]) if "value" in raw else None
        if "max" not in raw:
            raise ctx.error("rate.max", "is required (calls admitted every `per` seconds)")
        top = self.rate_count(ctx, "rate.max", raw["max"])
        per = 1.0
        if "per" in raw:
            per = raw["per"]
            if isinstance(per, bool) or not isinstance(per, int | float):
                raise ctx.error("rate.per", f"must be a number of seconds, not {type_name(per)}")
            if not math.isfinite(per) or not 0 < per <= MAX_PER:
                raise ctx.error("rate.per", f"must be a number of seconds > 0 and <= {MAX_PER:g} (a day), not {per!r}")
            per = float(per)
        burst = self.rate_count(ctx, "rate.burst", raw["burst"]) if "burst" in raw else top
        schedule: list[tuple[Window, int, int]] = []
        if "schedule" in raw:
            for key, window, table in self.windows(ctx, "rate.schedule", raw["schedule"], ("max", "burst")):
                if "max" not in table:
                    raise ctx.error(f"{key}.max", "is required (the rate inside this window)")
                wmax = self.rate_count(ctx, f"{key}.max", table["max"])
                wburst = self.rate_count(ctx, f"{key}.burst", table["burst"]) if "burst" in table else wmax
                schedule.append((window, wmax, wburst))
        return Rate(value, top, per, burst, tuple(schedule))

    def rate_count(self, ctx: _Ctx, key: str, raw: Any) -> int:
        n = _expect(ctx, key, raw, int, "an integer")
        if not 1 <= n <= MAX_RATE:
            hint = " (a rate of 0 admits nothing: to refuse every call use a limit with max = 0)" \
                if n == 0 and key.endswith("max") else ""
            raise ctx.error(key, f"must be between 1 and {MAX_RATE}, not {n}{hint}")
        return int(n)

    def overrides_file(self, ctx: _Ctx, raw: Any) -> tuple[str, str, dict[str, tuple[int, int]]]:
        """Read and parse an overrides file (path relative to the rule's file): (path, ref, values)."""
        key = "limit.overrides_file"
        ref = _expect(ctx, key, raw, str, "a string (a file name)")
        if not ref or "\0" in ref:
            raise ctx.error(key, f"bad file name {ref!r}")
        if not ref.lower().endswith((".csv", ".toml")):
            raise ctx.error(key, f"must name a .csv or a .toml file, not {ref!r}")
        path = str(Path(ctx.file).parent / ref)
        if Path(path) in self.sources:
            raise ctx.error(key, f"{path} is a rule file: keep overrides files out of the rule files "
                                 "(another directory, or .csv)")
        if path not in self.data:
            try:
                text = self.read(path)
            except (OSError, UnicodeDecodeError) as exc:
                raise ctx.error(key, f"cannot read {path}: {exc}") from None
            self.data[path] = (ref, text, None)
        ref0, text, parsed = self.data[path]
        if parsed is None:
            try:
                parsed = parse_overrides(path, text)
            except DataError as exc:
                raise RuleError(f"{path}:{exc.line}" if exc.line else path, ctx.name, None, exc.message) from None
            self.data[path] = (ref0, text, parsed)
        return path, ref, parsed

    def count(self, ctx: _Ctx, key: str, raw: Any) -> int:
        cap = _expect(ctx, key, raw, int, "an integer")
        if cap < 0:
            raise ctx.error(key, "must be >= 0")
        return int(cap)

    # conditions ---------------------------------------------------------------------------

    def match_table(self, ctx: _Ctx, key: str, raw: Any, depth: int = 0) -> list[Cond]:
        """The conditions of a condition table (all must hold); never empty."""
        _expect(ctx, key, raw, dict, "a table")
        if not raw:
            raise ctx.error(key, "is empty: a condition table needs at least one condition"
                            + (" (leave match out to match every call)" if key == "match" else ""))
        if depth >= MAX_DEPTH:
            raise ctx.error(key, f"nested too deep (more than {MAX_DEPTH} levels of all/any/not)")
        conds = []
        for name, spec in raw.items():
            sub = f"{key}.{name}"
            if name in COMBINATORS:
                kind, build = COMBINATORS[name]
                if kind == "array":
                    tables = _expect(ctx, sub, spec, list, "an array of tables")
                    if not tables:
                        raise ctx.error(sub, f"is empty: {name} needs at least one condition table")
                    groups = [self.match_table(ctx, f"{sub}[{i}]", t, depth + 1) for i, t in enumerate(tables)]
                else:
                    groups = [self.match_table(ctx, sub, spec, depth + 1)]
                conds.append(build(groups))
            else:
                self.field_name(ctx, sub, name)
                conds.append(self.field_cond(ctx, sub, name, spec))
        return conds

    def field_cond(self, ctx: _Ctx, key: str, name: str, spec: Any) -> Cond:
        if isinstance(spec, str):
            return self.op_cond(ctx, key, name, "eq", spec)
        if not isinstance(spec, dict):
            raise ctx.error(key, f"must be a string (equality) or a table of operators, not {type_name(spec)}")
        _check_keys(ctx, f"{key}.", spec, OPERATORS)
        if not spec:
            raise ctx.error(key, f"needs an operator ({', '.join(OPERATORS)})")
        conds: list[Cond] = []
        for op, arg in spec.items():
            conds.append(self.op_cond(ctx, f"{key}.{op}", name, op, arg))
        return all_of(conds)

    def op_cond(self, ctx: _Ctx, key: str, name: str, op: str, arg: Any) -> Cond:
        """One operator on one field; on a field of known values (a classify attribute, a time
        field) a value it never takes, or a test none of its values passes, is an error."""
        oper = OPERATORS[op]
        try:
            parsed = oper.parse(arg)
        except BadArg as exc:
            raise ctx.error(key, exc.message) from None
        cond = oper.build(name, parsed)
        dom = self.domains.get(name)
        if dom is not None:
            for value in oper.literals(parsed) if oper.literals else ():
                if value not in dom.values:
                    raise ctx.error(key, f"{value!r} is not a value of {name!r} ({dom.listing})")
            probes = [{name: v} for v in dom.values] + ([] if dom.always else [{}])
            if not any(cond.test(p, _PROBE_TIME) for p in probes):
                raise ctx.error(key, f"can never hold: none of the values of {name!r} ({dom.listing}"
                                + ("" if dom.always else ", or absent") + ") passes it")
        return cond

    # the whole --------------------------------------------------------------------------------

    def finish(self, files: Sequence[str], digest: Any) -> Ruleset:
        rules = [self.finish_rule(ctx, raw, fields) for ctx, raw, fields in self.raw_rules]
        by_name = {r.name: r for r in rules}
        for file, rule_name in self.override_where:
            target = by_name.get(rule_name)
            ctx = _Ctx(file, None)
            if target is None:
                raise ctx.error(f"overrides.{rule_name}", f"no rule named {rule_name!r}")
            if target.limit is None or target.limit.value is None:
                raise ctx.error(f"overrides.{rule_name}", f"rule {rule_name!r} has no limit on a with-value profile")
        done = []
        for r in rules:
            extra = self.overrides.get(r.name)
            if extra and r.limit is not None:
                merged = dict(r.limit.overrides)
                sources = list(r.limit.sources)
                inline = dict(sources[0][1]) if sources and sources[0][0] == "limit.overrides" else {}
                for value, (cap, file) in extra.items():
                    if value in inline:
                        raise RuleError(file, None, f"overrides.{r.name}.{value}",
                                        f"override already set inline in rule {r.name!r} ({r.file})")
                    if value in merged:
                        where = next(ref for ref, vals in sources if value in vals)
                        raise RuleError(file, None, f"overrides.{r.name}.{value}",
                                        f"override already set in {where} (limit.overrides_file of rule {r.name!r})")
                    merged[value] = cap
                for file in dict.fromkeys(f for _, f in extra.values()):
                    sources.append((f"[overrides.{r.name}] in {file}",
                                    {v: c for v, (c, f) in extra.items() if f == file}))
                r = replace(r, limit=replace(r.limit, overrides=merged, sources=tuple(sources)))
            done.append(r.with_steps())
        for ref, text, _ in self.data.values():
            # the data files are part of the version: by the name the rules give them
            digest.update(b"data\0" + _utf8(ref) + b"\0" + _utf8(text) + b"\0")
        return Ruleset(
            no_value=frozenset(self.no_value),
            with_value=frozenset(self.with_value),
            classifiers=tuple(self.classifiers),
            rules=tuple(done),
            files=tuple(files),
            version=digest.hexdigest()[:12],
            by_name={r.name: r for r in done},
            tz=self.tz,
            zone=get_tz(self.tz),
            time_fields=self.time_fields,
            data_files=tuple(self.data),
        )


def _utf8(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")


def compile_sources(sources: Sequence[tuple[str, str]], read: Reader | None = None) -> Ruleset:
    """Compile rule files given as (file name, TOML text), in order.

    Overrides files (`limit.overrides_file`, relative to the rule's file) are read with
    `read(path) -> text`, which may raise OSError; by default from disk. The version hashes the
    rule files' names and texts, then the overrides files' names (as the rules give them) and
    texts.

    Raises only `RuleError`, whatever the input: an unexpected exception (a bug) becomes a
    RuleError saying so, so a reload never dies of one.
    """
    comp = _Compiler(read or read_data_file)
    comp.sources = {Path(name) for name, _ in sources}
    digest = hashlib.sha256()
    current = sources[0][0] if sources else "<rules>"
    try:
        for name, text in sources:
            current = name
            # by file name, not path: the same rules give the same version on every node
            digest.update(_utf8(Path(name).name) + b"\0" + _utf8(text) + b"\0")
            comp.file(name, text)
        current = "<rules>"
        return comp.finish([n for n, _ in sources], digest)
    except RuleError:
        raise
    except RecursionError:
        raise RuleError(current, None, None, "nested too deep") from None
    except Exception as exc:
        raise RuleError(current, None, None, f"internal error while compiling (a bug): {exc!r}") from exc
