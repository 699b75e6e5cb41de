"""Properties of the rules, by Hypothesis:

- the generated evaluator gives exactly the interpreter's plan and attributes, for generated
  rule *shapes* (nested all/any/not, every operator, classifiers, time fields, schedules on
  rules, limits and rates, max_from, inline/file/table overrides, call rates with and without
  a value, final, shadow), random requests and random times;
- explanations are JSON-able and agree with the plan;
- loading never raises anything but RuleError, whatever the TOML (or not-TOML) text.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from policy.errors import RuleError
from policy.rules import OPERATORS, Ruleset, compile_sources

# -- a tiny TOML writer (inline values only: enough for any document) ----------------------------

_ESCAPES = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\t": "\\t", "\r": "\\r", "\b": "\\b", "\f": "\\f"}


def tstr(s: str) -> str:
    """A TOML basic string."""
    out = []
    for ch in s:
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def tval(v: Any) -> str:
    """A TOML inline value."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return "nan" if v != v else ("inf" if v == float("inf") else "-inf" if v == float("-inf") else repr(v))
    if isinstance(v, str):
        return tstr(v)
    if isinstance(v, dt.datetime | dt.date | dt.time):
        return v.isoformat()
    if isinstance(v, list):
        return "[" + ", ".join(tval(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{tstr(k)} = {tval(x)}" for k, x in v.items()) + " }"
    raise TypeError(type(v))


def tdoc(doc: dict[str, Any]) -> str:
    """A TOML document: top-level key = inline value lines."""
    return "".join(f"{tstr(k)} = {tval(v)}\n" for k, v in doc.items())


# -- rule shapes -------------------------------------------------------------------------------------

ZONES = ["UTC", "Europe/Berlin", "America/New_York", "Asia/Kathmandu", "Australia/Lord_Howe"]
DAYS = ["mon", "fri", "sun", "mon-fri", "sat-mon", "fri-sat"]
HOURS = ["08:00-18:00", "22:00-06:00", "00:00-24:00", "23:59-00:01", "12:00-12:01", "06:30-07:45"]
REQ_VALUES: dict[str, list[str]] = {
    "to_user": ["112", "0044", "0301", "6002", "", "00", "9"],
    "account": ["acme", "a,b", "beta", "", "gold-1", "5"],
    "src_ip": ["10.1.1.1", "2001:db8::5", "192.0.2.1", "junk", ""],
    "from_user": ["6001", "", "x"],
    "attrs.x": ["1", "3", "5", "", "abc", "99", "007"],
}
PLAIN_FIELDS = list(REQ_VALUES)
STR_POOL = sorted({v for vs in REQ_VALUES.values() for v in vs} | {"x", "yes", "00"})
REGEX_POOL = ["^0", "^00", "a", "^$", "1$", ".", "^(112|911)$", "[0-9]+", "b"]
TIME_DOMAIN = {
    "hour": [f"{h:02d}" for h in range(24)],
    "weekday": ["mon", "tue", "wed", "thu", "fri", "sat", "sun"],
    "time": ["00:00", "08:30", "12:00", "22:15", "23:59"],
}
CLASS_VALUES = ["x", "y", "z", "00", "5"]
NETS = ["10.0.0.0/8", "192.0.2.0/24", "::/0"]


@st.composite
def window(draw: st.DrawFn, with_max: bool, with_burst: bool = False) -> dict[str, Any]:
    """A schedule window table (rate windows: max >= 1, maybe a burst)."""
    w: dict[str, Any] = {}
    kind = draw(st.sampled_from(["days", "hours", "both"]))
    if kind in ("days", "both"):
        w["days"] = draw(st.one_of(st.sampled_from(DAYS), st.lists(st.sampled_from(DAYS), min_size=1, max_size=2)))
    if kind in ("hours", "both"):
        w["hours"] = draw(st.one_of(st.sampled_from(HOURS), st.lists(st.sampled_from(HOURS), min_size=1, max_size=2)))
    if draw(st.booleans()):
        w["tz"] = draw(st.sampled_from(ZONES))
    if with_max:
        w["max"] = draw(st.integers(1 if with_burst else 0, 30))
    if with_burst and draw(st.booleans()):
        w["burst"] = draw(st.integers(1, 40))
    return w


@st.composite
def field_cond(draw: st.DrawFn, domains: dict[str, tuple[list[str], bool]]) -> tuple[str, Any]:
    """One field and its condition (a string, or a table of 1-2 operators), valid by construction."""
    name = draw(st.sampled_from(PLAIN_FIELDS + sorted(domains)))
    if name in domains:
        values, always = domains[name]
        value = st.sampled_from(values)
        # each operator alone must be satisfiable by some value (or absence): else a load error
        spare = len(values) - 1 if always else len(values)
        ops = {
            "eq": value,
            "in": st.lists(value, min_size=1, max_size=3),
            "prefix": value.map(lambda v: v[: max(1, len(v) // 2)]),
            "regex": value.map(lambda v: "^" + re.escape(v)),
            "present": st.just(True) if always else st.booleans(),
        }
        if spare:
            ops["ne"] = value
            ops["not_in"] = st.lists(value, min_size=1, max_size=min(3, spare), unique=True)
    else:
        ops = {
            "eq": st.sampled_from(STR_POOL),
            "ne": st.sampled_from(STR_POOL),
            "in": st.lists(st.sampled_from(STR_POOL), min_size=1, max_size=3),
            "not_in": st.lists(st.sampled_from(STR_POOL), min_size=1, max_size=3),
            "prefix": st.one_of(st.sampled_from(STR_POOL), st.lists(st.sampled_from(STR_POOL), min_size=1, max_size=3)),
            "regex": st.sampled_from(REGEX_POOL),
            "cidr": st.one_of(st.sampled_from(["10.0.0.0/8", "2001:db8::/32"]),
                              st.lists(st.sampled_from(NETS), min_size=1, max_size=2)),
            "present": st.booleans(),
        }
    chosen = draw(st.lists(st.sampled_from(sorted(ops)), min_size=1, max_size=2, unique=True))
    if chosen == ["eq"] and draw(st.booleans()):
        return name, draw(ops["eq"])
    return name, {op: draw(ops[op]) for op in chosen}


def match_table(domains: dict[str, tuple[list[str], bool]]) -> st.SearchStrategy[dict[str, Any]]:
    """A condition table: field conditions and nested all/any/not, never empty."""
    leaf = field_cond(domains).map(lambda kv: {kv[0]: kv[1]})

    def extend(inner: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[dict[str, Any]]:
        return st.one_of(
            st.lists(inner, min_size=1, max_size=3).map(lambda ts: {"all": ts}),
            st.lists(inner, min_size=1, max_size=3).map(lambda ts: {"any": ts}),
            inner.map(lambda t: {"not": t}),
            st.tuples(inner, inner).map(lambda ab: {**ab[0], **ab[1]}),
        )

    return st.recursive(leaf, extend, max_leaves=8)


TEMPLATES = ["{account}", "{to_user}@{account}", "{attrs.x}", "u:{from_user}", "{account}-{hour}", "{weekday}"]


@st.composite
def ruleset_doc(draw: st.DrawFn) -> tuple[str, dict[str, str]]:
    """A rule file (TOML text) of generated shapes, and the overrides files it reads."""
    doc: dict[str, Any] = {}
    if draw(st.booleans()):
        doc["time"] = {"tz": draw(st.sampled_from(ZONES))}
    doc["profiles"] = {"no_value": ["n1", "n2"], "with_value": ["w1", "w2"]}
    domains: dict[str, tuple[list[str], bool]] = {k: (v, True) for k, v in TIME_DOMAIN.items()}
    classify = []
    for i in range(draw(st.integers(0, 2))):
        cases = [{"value": draw(st.sampled_from(CLASS_VALUES)), "regex": draw(st.sampled_from(REGEX_POOL))}
                 for _ in range(draw(st.integers(1, 3)))]
        sources = [*PLAIN_FIELDS, "hour", *sorted(k for k in domains if k.startswith("c"))]
        cl: dict[str, Any] = {"attr": f"c{i}", "field": draw(st.sampled_from(sources)), "cases": cases}
        default = draw(st.one_of(st.none(), st.sampled_from(CLASS_VALUES)))
        if default is not None:
            cl["default"] = default
        classify.append(cl)
        values = list(dict.fromkeys([c["value"] for c in cases] + ([default] if default else [])))
        domains[f"c{i}"] = (values, default is not None)
    if classify:
        doc["classify"] = classify
    files: dict[str, str] = {}
    rules = []
    templates = TEMPLATES + [f"{{{c['attr']}}}" for c in classify]
    for i in range(draw(st.integers(1, 5))):
        rule: dict[str, Any] = {"name": f"r{i}"}
        if draw(st.booleans()):
            rule["match"] = draw(match_table(domains))
        if draw(st.integers(0, 3)) == 0:
            rule["schedule"] = draw(st.one_of(window(False), st.lists(window(False), min_size=1, max_size=2)))
        joins = []
        for _ in range(draw(st.integers(0, 2))):
            if draw(st.booleans()):
                joins.append({"profile": draw(st.sampled_from(["n1", "n2"]))})
            else:
                joins.append({"profile": "w1", "value": draw(st.sampled_from(templates))})
        if joins:
            rule["join"] = joins
        if draw(st.booleans()):
            with_value = draw(st.booleans())
            limit: dict[str, Any] = {"profile": "w2" if with_value else "n2", "max": draw(st.integers(0, 20))}
            if with_value:
                limit["value"] = draw(st.sampled_from(templates))
                if draw(st.booleans()):
                    limit["overrides"] = draw(st.dictionaries(st.sampled_from([*STR_POOL, "u:6001"]),
                                                              st.integers(0, 9), max_size=3))
                if draw(st.booleans()):
                    name = f"o{i}.csv"
                    rows = draw(st.dictionaries(st.sampled_from(["acme", "a,b", "beta", "5", "u:x"]),
                                                st.integers(0, 9), max_size=4))
                    rows = {k: v for k, v in rows.items() if k not in limit.get("overrides", {})}
                    files[f"r/{name}"] = "value,max\n" + "".join(
                        f'"{k}",{v}\n' if "," in k else f"{k},{v}\n" for k, v in rows.items())
                    limit["overrides_file"] = name
            if draw(st.booleans()):
                limit["schedule"] = draw(st.one_of(window(True), st.lists(window(True), min_size=1, max_size=3)))
            if draw(st.booleans()):
                limit["max_from"] = draw(st.sampled_from(["attrs.x", "account"]))
                limit["ceiling"] = draw(st.integers(0, 50))
            rule["limit"] = limit
        if draw(st.integers(0, 2)) == 0:
            rate: dict[str, Any] = {"max": draw(st.integers(1, 50))}
            if draw(st.booleans()):
                rate["value"] = draw(st.sampled_from(templates))
            if draw(st.booleans()):
                rate["per"] = draw(st.sampled_from([1, 0.5, 60, 3600.0, 7]))
            if draw(st.booleans()):
                rate["burst"] = draw(st.integers(1, 100))
            if draw(st.booleans()):
                rate["schedule"] = draw(st.one_of(window(True, True),
                                                  st.lists(window(True, True), min_size=1, max_size=3)))
            rule["rate"] = rate
        if ("limit" in rule or "rate" in rule) and draw(st.booleans()):
            rule["shadow"] = True
        if draw(st.booleans()) or ("join" not in rule and "limit" not in rule and "rate" not in rule):
            rule["final"] = True
        rules.append(rule)
    doc["rule"] = rules
    return tdoc(doc), files


def reader(files: dict[str, str]):  # type: ignore[no-untyped-def]
    """A read callback over a dict of path -> text."""
    def read(path: str) -> str:
        if path not in files:
            raise FileNotFoundError(2, "No such file or directory", path)
        return files[path]
    return read


def request() -> st.SearchStrategy[dict[str, str]]:
    """A request of the fields the generated rules read."""
    return st.fixed_dictionaries({}, optional={k: st.sampled_from(v) for k, v in REQ_VALUES.items()})


TIMES = st.one_of(st.integers(0, 4_102_444_800), st.floats(0, 4_102_444_800, allow_nan=False, allow_infinity=False))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ruleset_doc(), st.lists(st.tuples(request(), TIMES), min_size=1, max_size=6))
def test_generated_evaluator_equals_the_interpreter_for_generated_shapes(
        doc: tuple[str, dict[str, str]], calls: list[tuple[dict[str, str], float]]) -> None:
    """For any rule shape, request and time: same plan and attributes; explain agrees and is JSON."""
    text, files = doc
    rs = compile_sources([("r/rules.toml", text)], read=reader(files))
    for req, now in calls:
        fast = rs.evaluate(dict(req), now=now)
        ref = rs.interpret(dict(req), now=now)
        assert (fast.plan, list(fast.rates), fast.attrs) == (ref.plan, list(ref.rates), ref.attrs), (text, req, now)
        explained = rs.explain(req, now)
        json.dumps(explained)
        entries = [(e["profile"], e["value"], e["limit"]) for o in explained for e in o["entries"]]
        assert entries == [(e.profile, e.value, e.limit) for e in fast.plan]
        rates = [(o["rule"], e["value"], e["rate"], e["burst"]) for o in explained for e in o.get("rates", [])]
        assert rates == [(e.rule, e.value, e.rate, e.burst) for e in fast.rates]
        assert {o["rule"] for o in explained if o["matched"]} >= {e.rule for e in [*fast.plan, *fast.rates]}


@settings(max_examples=100, deadline=None)
@given(ruleset_doc(), request(), TIMES)
def test_evaluation_does_not_depend_on_earlier_evaluations(doc: tuple[str, dict[str, str]],
                                                           req: dict[str, str], now: float) -> None:
    """The generated evaluator's per-minute clock cache never leaks one call's time into another."""
    text, files = doc
    rs = compile_sources([("r/rules.toml", text)], read=reader(files))
    ev = rs.evaluate(dict(req), now=now)
    first = (ev.plan, list(ev.rates))
    for other in (now + 30, now - 61, now + 86_400 * 3.5, now):
        rs.evaluate(dict(req), now=other)
    ev = rs.evaluate(dict(req), now=now)
    assert (ev.plan, list(ev.rates)) == first
    ev = compile_sources([("r/rules.toml", text)], read=reader(files)).evaluate(dict(req), now=now)
    assert (ev.plan, list(ev.rates)) == first


# -- load errors: only RuleError -----------------------------------------------------------------

VOCAB = ["profiles", "no_value", "with_value", "classify", "attr", "field", "cases", "value", "regex", "default",
         "rule", "name", "match", "join", "limit", "profile", "max", "overrides", "overrides_file", "schedule",
         "days", "hours", "tz", "max_from", "ceiling", "deny", "code", "reason", "final", "shadow",
         "on_store_error", "description", "time", "all", "any", "not", "rate", "per", "burst", *OPERATORS,
         "to_user", "account", "type", "hour", "weekday", "attrs.x", "src_ip", "total", "r", "x"]
WORDS = ["mon-fri", "sat", "08:00-18:00", "22:00-06:00", "24:00-01:00", "Europe/Berlin", "Nope/Zone", "{account}",
         "{type}", "{", "^0", "(", "total", "account", "type", "x.csv", "x.toml", "../x.csv", "", "10.0.0.0/8",
         "r", "intl", "attrs.x", "hour", "00", "emergency", "allow", "deny"]
SCALARS = st.one_of(
    st.booleans(), st.integers(-3, 3), st.integers(), st.floats(), st.sampled_from(WORDS),
    st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=8),
    st.times(), st.dates(), st.datetimes(timezones=st.just(dt.UTC)),
)
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=4),
    st.dictionaries(st.sampled_from(VOCAB), inner, max_size=4)), max_leaves=20)
TABLES = st.dictionaries(st.sampled_from(VOCAB), VALUES, max_size=6)
DOCS = st.fixed_dictionaries({}, optional={
    "profiles": st.one_of(st.just({"no_value": ["total", "r"], "with_value": ["account", "type"]}), VALUES),
    "classify": st.one_of(st.lists(TABLES.map(lambda t: {"attr": "type", "field": "to_user", **t}), max_size=2),
                          VALUES),
    "rule": st.one_of(st.lists(TABLES, max_size=3).map(lambda ts: [{"name": f"r{i}", **t} for i, t in enumerate(ts)]),
                      VALUES),
    "overrides": VALUES,
    "time": st.one_of(st.just({"tz": "Europe/Berlin"}), VALUES),
})


def only_rule_errors(sources: list[tuple[str, str]], files: dict[str, str] | None = None) -> Ruleset | None:
    """Compile; a RuleError is fine (and must not be a bug's), anything else fails the test."""
    try:
        return compile_sources(sources, read=reader(files or {}))
    except RuleError as exc:
        assert "internal error" not in str(exc), str(exc)
        return None


@settings(max_examples=300, deadline=None)
@given(DOCS, st.dictionaries(st.sampled_from(["x.csv", "x.toml"]), st.text(max_size=40)))
def test_any_toml_document_is_a_ruleset_or_a_rule_error(doc: dict[str, Any], data: dict[str, str]) -> None:
    """Documents of the rules' own keys and any values: a Ruleset or a RuleError, nothing else."""
    only_rule_errors([("r/rules.toml", tdoc(doc))], {f"r/{k}": v for k, v in data.items()})


@settings(max_examples=200, deadline=None)
@given(ruleset_doc(), st.data())
def test_mutated_valid_documents_are_a_ruleset_or_a_rule_error(doc: tuple[str, dict[str, str]],
                                                               data: st.DataObject) -> None:
    """A valid generated file with one value replaced anywhere: a Ruleset or a RuleError."""
    import tomllib

    text, files = doc
    tree = tomllib.loads(text)
    node: Any = tree
    path = []
    while isinstance(node, dict | list) and node and data.draw(st.integers(0, 3)) > 0:
        key = data.draw(st.sampled_from(list(node) if isinstance(node, dict) else list(range(len(node)))))
        path.append((node, key))
        node = node[key]
    if path:
        parent, key = path[-1]
        parent[key] = data.draw(VALUES)
    only_rule_errors([("r/rules.toml", tdoc(tree))], files)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_any_text_is_a_ruleset_or_a_rule_error(text: str) -> None:
    """Not even TOML: a RuleError (or, rarely, an empty ruleset)."""
    only_rule_errors([("t.toml", text)])


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.sampled_from('ab,"\n\r #0123456789 \ufeff-'), max_size=80))
def test_any_overrides_csv_is_overrides_or_a_rule_error(csv: str) -> None:
    """Whatever the billing system writes: overrides or an error naming file and line."""
    rs = only_rule_errors([("r/rules.toml", '[profiles]\nwith_value = ["a"]\n[[rule]]\nname = "c"\n'
                                            'limit = { profile = "a", value = "{account}", max = 1, '
                                            'overrides_file = "x.csv" }\n')], {"r/x.csv": csv})
    if rs is not None:
        assert all(isinstance(v, int) and v >= 0 for v in rs.rules[0].limit.overrides.values())  # type: ignore[union-attr]
