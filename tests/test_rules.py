"""The rule compiler and evaluator: every capability, every load error, the shipped rules."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from policy.errors import RuleError
from policy.rules import Ruleset, compile_sources, load_rules

ROOT = Path(__file__).resolve().parent.parent
BAD = Path(__file__).resolve().parent / "rules_bad"
SHIPPED = load_rules(ROOT / "rules")

PROFILES = """
[profiles]
no_value = ["total", "emergency", "local", "international"]
with_value = ["user", "account", "type"]
"""

# One bad file per error, each with the exact message an operator sees (file, rule, key).
EXPECTED = {
    "bad_cidr": "bad_cidr.toml: rule 'trusted': key 'match.src_ip.cidr': bad network '10.0.0.0/33': '10.0.0.0/33' does not appear to be an IPv4 or IPv6 network",
    "bad_code": "bad_code.toml: rule 'cap': key 'deny.code': must be a SIP final error code 400-699, not 200",
    "bad_on_store_error": "bad_on_store_error.toml: rule 'cap': key 'on_store_error': must be 'allow' or 'deny', not 'maybe'",
    "bad_regex": "bad_regex.toml: rule 'intl': key 'match.to_user.regex': bad regex '^(00': missing ), unterminated subpattern at position 1",
    "bad_regex_overflow": "bad_regex_overflow.toml: rule 'r': key 'match.to_user.regex': bad regex 'a{99999999999}': the repetition number is too large",
    "ceiling_without_max_from": "ceiling_without_max_from.toml: rule 'cap': key 'limit.ceiling': bounds max_from: give max_from too, or leave ceiling out",
    "classify_bad_regex": "classify_bad_regex.toml: classify 'type': key 'cases[0].regex': bad regex '^00[': unterminated character set at position 3",
    "classify_never_holds": "classify_never_holds.toml: rule 'x': key 'match.type.prefix': can never hold: none of the values of 'type' (emergency, international, domestic, local) passes it",
    "classify_reserved_attr": "classify_reserved_attr.toml: classify 'any': key 'attr': 'any' is reserved (a match combinator)",
    "classify_value_not_in": "classify_value_not_in.toml: rule 'not-intl': key 'match.type.not_in': 'intl' is not a value of 'type' (emergency, international, domestic, local)",
    "classify_value_typo": "classify_value_typo.toml: rule 'emergency': key 'match.type': 'emergancy' is not a value of 'type' (emergency, international, domestic, local)",
    "deny_without_limit": "deny_without_limit.toml: rule 'all': key 'deny': needs a limit or a rate (a rule without either never denies)",
    "rate_burst_zero": "rate_burst_zero.toml: rule 'cps': key 'rate.burst': must be between 1 and 1000000, not 0",
    "rate_max_not_int": "rate_max_not_int.toml: rule 'cps': key 'rate.max': must be an integer, not a string",
    "rate_max_zero": "rate_max_zero.toml: rule 'cps': key 'rate.max': must be between 1 and 1000000, not 0 (a rate of 0 admits nothing: to refuse every call use a limit with max = 0)",
    "rate_not_table": "rate_not_table.toml: rule 'cps': key 'rate': must be a table, not an integer",
    "rate_per_not_number": "rate_per_not_number.toml: rule 'cps': key 'rate.per': must be a number of seconds, not a string",
    "rate_per_too_long": "rate_per_too_long.toml: rule 'cps': key 'rate.per': must be a number of seconds > 0 and <= 86400 (a day), not 172800",
    "rate_per_zero": "rate_per_zero.toml: rule 'cps': key 'rate.per': must be a number of seconds > 0 and <= 86400 (a day), not 0",
    "rate_schedule_bad_hours": "rate_schedule_bad_hours.toml: rule 'cps': key 'rate.schedule.hours': '8-18' is not a range of hours like '08:00-18:00'",
    "rate_schedule_burst_zero": "rate_schedule_burst_zero.toml: rule 'cps': key 'rate.schedule.burst': must be between 1 and 1000000, not 0",
    "rate_schedule_unknown_key": "rate_schedule_unknown_key.toml: rule 'cps': key 'rate.schedule.ceiling': unknown key (expected one of: burst, days, hours, max, tz)",
    "rate_schedule_without_max": "rate_schedule_without_max.toml: rule 'cps': key 'rate.schedule[1].max': is required (the rate inside this window)",
    "rate_unknown_field": "rate_unknown_field.toml: rule 'cps': key 'rate.value': template '{acount}' uses unknown field 'acount' (known: account, call_id, from, from_domain, from_user, hour, node, ruri, ruri_domain, ruri_user, src_ip, time, to, to_domain, to_user, weekday, attrs.NAME)",
    "rate_unknown_key": "rate_unknown_key.toml: rule 'cps': key 'rate.profile': unknown key (expected one of: burst, max, per, schedule, value)",
    "rate_without_max": "rate_without_max.toml: rule 'cps': key 'rate.max': is required (calls admitted every `per` seconds)",
    "duplicate_rule": "duplicate_rule.toml: rule 'all': key 'name': duplicate rule name (first defined in duplicate_rule.toml)",
    "empty_all": "empty_all.toml: rule 'r': key 'match.all': is empty: all needs at least one condition table",
    "empty_any": "empty_any.toml: rule 'r': key 'match.any': is empty: any needs at least one condition table",
    "empty_any_table": "empty_any_table.toml: rule 'r': key 'match.any[0]': is empty: a condition table needs at least one condition",
    "empty_match": "empty_match.toml: rule 'r': key 'match': is empty: a condition table needs at least one condition (leave match out to match every call)",
    "empty_not": "empty_not.toml: rule 'r': key 'match.not': is empty: a condition table needs at least one condition",
    "empty_operators": "empty_operators.toml: rule 'r': key 'match.account': needs an operator (eq, ne, regex, prefix, in, not_in, cidr, present)",
    "hour_not_a_value": "hour_not_a_value.toml: rule 'night': key 'match.hour': '8' is not a value of 'hour' (00 to 23)",
    "invalid_toml": "invalid_toml.toml: invalid TOML: Expected '=' after a key in a key/value pair (at line 1, column 6)",
    "limit_schedule_without_max": "limit_schedule_without_max.toml: rule 'peak': key 'limit.schedule[1].max': is required (the cap inside this window)",
    "max_from_unknown_field": "max_from_unknown_field.toml: rule 'cap': key 'limit.max_from': unknown field 'channels' (known: account, call_id, from, from_domain, from_user, hour, node, ruri, ruri_domain, ruri_user, src_ip, time, to, to_domain, to_user, weekday, attrs.NAME)",
    "max_from_without_ceiling": "max_from_without_ceiling.toml: rule 'cap': key 'limit.ceiling': is required with max_from (the most a request may ask for)",
    "missing_value": "missing_value.toml: rule 'cap': key 'limit.value': profile 'account' is declared with value: a value is required",
    "override_not_int": "override_not_int.toml: key 'overrides.cap.acme': must be an integer, not a string",
    "override_unknown_rule": "override_unknown_rule.toml: key 'overrides.acount-cap': no rule named 'acount-cap'",
    "overrides_file_and_inline": "data/good.csv:2: rule 'cap': value 'beta' is also in the rule's limit.overrides (overrides_file_and_inline.toml)",
    "overrides_file_bad_line": "data/bad_line.csv:4: rule 'cap': max must be a whole number >= 0, not 'ten'",
    "overrides_file_duplicate": "data/duplicate.csv:6: rule 'cap': value 'acme' is already on line 4",
    "overrides_file_extension": "overrides_file_extension.toml: rule 'cap': key 'limit.overrides_file': must name a .csv or a .toml file, not 'data/accounts.txt'",
    "overrides_file_fields": "data/three_fields.csv:1: rule 'cap': expected 2 fields (value,max), not 3",
    "overrides_file_missing": "overrides_file_missing.toml: rule 'cap': key 'limit.overrides_file': cannot read data/no-such-file.csv: no such regular file",
    "overrides_file_no_value": "overrides_file_no_value.toml: rule 'intl': key 'limit.overrides_file': profile 'intl' has no values to override",
    "overrides_file_toml_bad": "data/bad.toml: rule 'cap': key 'beta': max must be a whole number >= 0, not '4'",
    "rule_does_nothing": "rule_does_nothing.toml: rule 'idle': does nothing: give it a join, a limit, a rate or final = true",
    "schedule_bad_day": "schedule_bad_day.toml: rule 'office': key 'schedule.days': 'fry' is not a day (mon, tue, wed, thu, fri, sat, sun; ranges like 'mon-fri')",
    "schedule_bad_hours": "schedule_bad_hours.toml: rule 'office': key 'schedule.hours': '8:00-18:00' is not a range of hours like '08:00-18:00'",
    "schedule_empty": "schedule_empty.toml: rule 'night': key 'schedule': is empty: give at least one window (days and/or hours)",
    "schedule_empty_range": "schedule_empty_range.toml: rule 'never': key 'schedule.hours': '08:00-08:00' is empty (for the whole day leave hours out, or write '00:00-24:00')",
    "schedule_hour_out_of_range": "schedule_hour_out_of_range.toml: rule 'night': key 'schedule.hours': '22:00-24:30': 24:30 is not a time of day (00:00 to 24:00)",
    "schedule_no_days_or_hours": "schedule_no_days_or_hours.toml: rule 'night': key 'schedule': needs days or hours (or both)",
    "schedule_unknown_key": "schedule_unknown_key.toml: rule 'night': key 'schedule.max': unknown key (expected one of: days, hours, tz)",
    "schedule_unknown_tz": "schedule_unknown_tz.toml: rule 'night': key 'schedule.tz': unknown time zone 'Europe/Berln' (an IANA name such as 'Europe/Berlin')",
    "shadow_without_limit": "shadow_without_limit.toml: rule 'all': key 'shadow': needs a limit or a rate (only limits and rates can be shadowed)",
    "time_unknown_tz": "time_unknown_tz.toml: key 'time.tz': unknown time zone 'Mars/Olympus_Mons' (an IANA name such as 'Europe/Berlin')",
    "too_deep": "too_deep.toml: rule 'deep': key 'match.not.not.not.not.not.not.not.not.not.not.not.not.not.not.not.not': nested too deep (more than 16 levels of all/any/not)",
    "undefined_profile": "undefined_profile.toml: rule 'cap': key 'limit.profile': undefined profile 'acount'",
    "unknown_key": "unknown_key.toml: rule 'cap': key 'limit.maxx': unknown key (expected one of: ceiling, max, max_from, overrides, overrides_file, profile, schedule, value)",
    "unknown_match_field": "unknown_match_field.toml: rule 'all': key 'match.to_usr': unknown field 'to_usr' (known: account, call_id, from, from_domain, from_user, hour, node, ruri, ruri_domain, ruri_user, src_ip, time, to, to_domain, to_user, weekday, attrs.NAME)",
    "unknown_template_field": "unknown_template_field.toml: rule 'cap': key 'limit.value': template '{acount}' uses unknown field 'acount' (known: account, call_id, from, from_domain, from_user, hour, node, ruri, ruri_domain, ruri_user, src_ip, time, to, to_domain, to_user, weekday, attrs.NAME)",
    "unknown_top_level": "unknown_top_level.toml: key 'rules': unknown key (expected one of: classify, overrides, profiles, rule, time)",
    "value_on_no_value": "value_on_no_value.toml: rule 'all': key 'join[0].value': profile 'total' is declared without value: it takes no value",
    "weekday_not_a_value": "weekday_not_a_value.toml: rule 'weekend': key 'match.weekday.in': 'sunday' is not a value of 'weekday' (mon, tue, wed, thu, fri, sat, sun)",
    "wrong_type": "wrong_type.toml: rule 'cap': key 'limit.max': must be an integer, not a string",
}


def rules(text: str, name: str = "t.toml") -> Ruleset:
    """Compile one rule file of TOML text (profiles prepended)."""
    return compile_sources([(name, PROFILES + text)])


def plan_of(rs: Ruleset, **req: str) -> list[tuple[str, str | None, int | None]]:
    """The (profile, value, limit) triples of a request's plan."""
    return [(e.profile, e.value, e.limit) for e in rs.evaluate(dict(req)).plan]


def test_every_bad_file_has_an_expected_message() -> None:
    """Each file in tests/rules_bad is covered by EXPECTED and vice versa."""
    assert sorted(p.stem for p in BAD.glob("*.toml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_bad_rule_file_message(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A broken file is refused with the exact message naming file, rule and key."""
    monkeypatch.chdir(BAD)  # overrides files are relative to the rule file: rules_bad/data/
    path = BAD / f"{name}.toml"
    with pytest.raises(RuleError) as info:
        compile_sources([(path.name, path.read_text())])
    assert str(info.value) == EXPECTED[name]


def test_attribute_from_a_later_file_is_unknown_to_earlier_rules() -> None:
    """Derived attributes exist only for rules after their classifier."""
    a = PROFILES + '[[rule]]\nname = "intl"\nmatch = { type = "international" }\njoin = [{ profile = "total" }]\n'
    b = '[[classify]]\nattr = "type"\nfield = "to_user"\ncases = [{ value = "international", regex = "^00" }]\n'
    with pytest.raises(RuleError, match=r"a\.toml: rule 'intl': key 'match\.type': unknown field 'type'"):
        compile_sources([("a.toml", a), ("b.toml", b)])
    compile_sources([("a.toml", PROFILES + b), ("b.toml", a.replace(PROFILES, ""))])


def test_profile_declared_twice_names_both_files() -> None:
    """Declaring a profile in two files is an error naming the first."""
    with pytest.raises(RuleError, match=r"b\.toml: key 'profiles\.no_value': profile 'total' is already "
                                        r"declared in a\.toml"):
        compile_sources([("a.toml", PROFILES), ("b.toml", '[profiles]\nno_value = ["total"]\n')])


def test_no_value_and_with_value_profiles() -> None:
    """A no-value profile joins without a value; a with-value profile with its rendered value."""
    rs = rules('[[rule]]\nname = "r"\njoin = [{ profile = "total" }, { profile = "user", '
               'value = "{from_user}@{from_domain}" }]\n')
    assert plan_of(rs, from_user="6001", from_domain="example.com") == [
        ("total", None, None), ("user", "6001@example.com", None)]


def test_template_with_missing_field_skips_the_rule() -> None:
    """A template whose field is empty makes its rule not apply (and says why)."""
    rs = rules('[[rule]]\nname = "r"\nlimit = { profile = "account", value = "{account}", max = 2 }\n')
    ev = rs.evaluate({"from_user": "x"}, explain=True)
    assert ev.plan == []
    assert ev.outcomes[0].why == "skipped: template '{account}' has an empty field"


def test_classify_first_match_wins_with_default() -> None:
    """Cases are tried in order; the default applies when none matches."""
    rs = rules('''
[[classify]]
attr = "type"
field = "to_user"
default = "local"
cases = [
  { value = "emergency", regex = '^(110|112|119|120|911)$' },
  { value = "international", regex = '^00' },
  { value = "domestic", regex = '^0' },
]
[[rule]]
name = "t"
join = [{ profile = "type", value = "{type}" }]
''')
    for to_user, want in [("112", "emergency"), ("1120", "local"), ("0049301234", "international"),
                          ("030123", "domestic"), ("6002", "local"), ("", "local")]:
        req = {"to_user": to_user}
        assert plan_of(rs, **req) == [("type", want, None)], to_user


def test_classify_without_default_leaves_attribute_unset() -> None:
    """With no default and no match, the attribute is absent, so `present` is false."""
    rs = rules('''
[[classify]]
attr = "vip"
field = "account"
cases = [{ value = "yes", regex = "^vip-" }]
[[rule]]
name = "vip"
match = { vip = { present = true } }
join = [{ profile = "total" }]
''')
    assert plan_of(rs, account="vip-1") == [("total", None, None)]
    assert plan_of(rs, account="acme") == []


@pytest.mark.parametrize(("cond", "req", "want"), [
    ('{ account = "acme" }', {"account": "acme"}, True),
    ('{ account = "acme" }', {"account": "acme2"}, False),
    ('{ account = { eq = "acme" } }', {"account": "acme"}, True),
    ('{ account = { ne = "acme" } }', {"account": "beta"}, True),
    ('{ to_user = { regex = "^00" } }', {"to_user": "0044"}, True),
    ('{ to_user = { regex = "^00" } }', {"to_user": "044"}, False),
    ('{ to_user = { prefix = ["00", "+"] } }', {"to_user": "+44"}, True),
    ('{ to_user = { prefix = "00" } }', {"to_user": "0"}, False),
    ('{ account = { in = ["a", "b"] } }', {"account": "b"}, True),
    ('{ account = { in = ["a", "b"] } }', {"account": "c"}, False),
    ('{ account = { not_in = ["a"] } }', {"account": "c"}, True),
    ('{ src_ip = { cidr = ["10.0.0.0/8", "2001:db8::/32"] } }', {"src_ip": "10.1.2.3"}, True),
    ('{ src_ip = { cidr = ["10.0.0.0/8", "2001:db8::/32"] } }', {"src_ip": "2001:db8::1"}, True),
    ('{ src_ip = { cidr = "10.0.0.0/8" } }', {"src_ip": "192.168.1.1"}, False),
    ('{ src_ip = { cidr = "10.0.0.0/8" } }', {"src_ip": "not-an-ip"}, False),
    ('{ src_ip = { cidr = "10.0.0.0/8" } }', {}, False),
    ('{ account = { present = true } }', {"account": ""}, False),
    ('{ account = { present = false } }', {}, True),
    ('{ account = "acme", to_user = "1" }', {"account": "acme", "to_user": "2"}, False),
    ('{ all = [{ account = "acme" }, { to_user = "1" }] }', {"account": "acme", "to_user": "1"}, True),
    ('{ any = [{ account = "x" }, { to_user = "1" }] }', {"account": "acme", "to_user": "1"}, True),
    ('{ any = [{ account = "x" }, { to_user = "2" }] }', {"account": "acme", "to_user": "1"}, False),
    ('{ not = { account = "acme" } }', {"account": "acme"}, False),
    ('{ not = { account = "acme" } }', {"account": "beta"}, True),
    ('{ "attrs.tenant" = "t1" }', {"attrs.tenant": "t1"}, True),
])
def test_match_conditions(cond: str, req: dict[str, str], want: bool) -> None:
    """Equality, regex, prefix, set membership, CIDR, presence, all-of, any-of, negation."""
    rs = rules(f'[[rule]]\nname = "r"\nmatch = {cond}\njoin = [{{ profile = "total" }}]\n')
    assert bool(plan_of(rs, **req)) is want


def test_limit_with_inline_and_file_overrides() -> None:
    """Per-value overrides come inline or from an overrides table in another file."""
    main = PROFILES + ('[[rule]]\nname = "cap"\nlimit = { profile = "account", value = "{account}", max = 10, '
                       'overrides = { beta = 7 } }\n')
    extra = "[overrides.cap]\nacme = 3\n"
    rs = compile_sources([("a.toml", main), ("b.toml", extra)])
    assert plan_of(rs, account="acme") == [("account", "acme", 3)]
    assert plan_of(rs, account="beta") == [("account", "beta", 7)]
    assert plan_of(rs, account="other") == [("account", "other", 10)]
    with pytest.raises(RuleError, match=r"b\.toml: key 'overrides\.cap\.beta': override already set inline"):
        compile_sources([("a.toml", main), ("b.toml", "[overrides.cap]\nbeta = 1\n")])


def test_thousands_of_overrides() -> None:
    """A file of thousands of account caps compiles and is one lookup per call."""
    main = PROFILES + '[[rule]]\nname = "cap"\nlimit = { profile = "account", value = "{account}", max = 10 }\n'
    extra = "[overrides.cap]\n" + "".join(f'"acct{i}" = {i % 50}\n' for i in range(5000))
    rs = compile_sources([("a.toml", main), ("accounts.toml", extra)])
    assert plan_of(rs, account="acct4321") == [("account", "acct4321", 4321 % 50)]


def test_final_stops_later_rules() -> None:
    """A matching final rule ends evaluation; a non-matching one does not."""
    rs = rules('''
[[rule]]
name = "emergency"
match = { to_user = "112" }
limit = { profile = "emergency", max = 5 }
final = true
[[rule]]
name = "cap"
limit = { profile = "account", value = "{account}", max = 3 }
''')
    assert plan_of(rs, to_user="112", account="acme") == [("emergency", None, 5)]
    assert plan_of(rs, to_user="6000", account="acme") == [("account", "acme", 3)]


def test_rule_fields_are_kept() -> None:
    """deny code/reason, shadow and on_store_error are compiled as given, with defaults."""
    rs = rules('''
[[rule]]
name = "a"
limit = { profile = "total", max = 1 }
deny = { code = 503, reason = "Busy here" }
shadow = true
on_store_error = "allow"
[[rule]]
name = "b"
limit = { profile = "total", max = 1 }
''')
    a, b = rs.by_name["a"], rs.by_name["b"]
    assert (a.code, a.reason, a.shadow, a.on_store_error) == (503, "Busy here", True, "allow")
    assert (b.code, b.reason, b.shadow, b.on_store_error) == (486, "Call limit reached", False, "deny")
    assert rs.evaluate({}).plan[0].shadow is True


def test_explain_names_the_failing_condition() -> None:
    """A dry-run explanation says which condition did not hold."""
    rs = rules('[[rule]]\nname = "r"\nmatch = { account = "acme", to_user = { prefix = "00" } }\n'
               'join = [{ profile = "total" }]\n')
    ev = rs.evaluate({"account": "acme", "to_user": "12"}, explain=True)
    assert ev.outcomes[0].why == "not matched: to_user starts with '00'"


# -- the shipped rules -----------------------------------------------------------------


@pytest.fixture(scope="module")
def shipped() -> Ruleset:
    """The rules/ directory as shipped."""
    return load_rules(ROOT / "rules")


def test_shipped_profiles(shipped: Ruleset) -> None:
    """The dialog module's documented profiles."""
    assert shipped.no_value == {"total", "emergency", "local", "domestic", "international"}
    assert shipped.with_value == {"user", "account", "type"}


def test_shipped_emergency_plan(shipped: Ruleset) -> None:
    """Emergency: total, type=emergency, and the emergency cap of 5 only (final)."""
    for number in ("110", "112", "119", "120", "911"):
        assert plan_of(shipped, to_user=number, account="acme", from_user="6001", from_domain="example.com") == [
            ("total", None, None), ("type", "emergency", None), ("emergency", None, 5)]
    rule = shipped.by_name["emergency"]
    assert (rule.code, rule.reason, rule.final, rule.on_store_error) == (
        503, "Emergency capacity exhausted", True, "allow")


def test_shipped_ordinary_plan(shipped: Ruleset) -> None:
    """Ordinary calls join their class and meet the account (acme: 3) and user (4) caps."""
    assert plan_of(shipped, to_user="0301234", account="acme", from_user="6001", from_domain="example.com") == [
        ("total", None, None), ("type", "domestic", None), ("domestic", None, None),
        ("account", "acme", 3), ("user", "6001@example.com", 4)]
    assert plan_of(shipped, to_user="6002", account="other", from_user="6001", from_domain="example.com") == [
        ("total", None, None), ("type", "local", None), ("local", None, None),
        ("account", "other", 10), ("user", "6001@example.com", 4)]
    assert shipped.by_name["account-cap"].code == 486
    assert shipped.by_name["account-cap"].reason == "Account call limit reached"
    assert shipped.by_name["user-cap"].reason == "User call limit reached"


def test_shipped_shadow_rule(shipped: Ruleset) -> None:
    """The shipped shadow rule limits international calls without enforcing."""
    ev = shipped.evaluate({"to_user": "00861012345678", "from_user": "6001", "from_domain": "example.com"})
    shadow = [e for e in ev.plan if e.shadow]
    assert [(e.profile, e.limit, e.rule) for e in shadow] == [("international", 2, "international-shadow")]


@given(st.dictionaries(st.sampled_from(["to_user", "from_user", "from_domain", "account", "src_ip",
                                        "attrs.x", "call_id"]), st.text(max_size=20)))
def test_evaluate_any_request(req: dict[str, str]) -> None:
    """Any request of strings evaluates without error into a plan of declared profiles."""
    rs = SHIPPED
    ev = rs.evaluate(dict(req))
    for e in ev.plan:
        assert e.profile in rs.profiles
        assert (e.value is None) == (e.profile in rs.no_value)


RICH = PROFILES + '''
[[classify]]
attr = "type"
field = "to_user"
default = "local"
cases = [{ value = "emergency", regex = '^(112|911)$' }, { value = "international", regex = '^00' }]
[[classify]]
attr = "tier"
field = "account"
cases = [{ value = "gold", regex = '^g' }]
[[rule]]
name = "all"
join = [{ profile = "total" }, { profile = "type", value = "{type}" }]
[[rule]]
name = "trusted"
match = { src_ip = { cidr = ["10.0.0.0/8", "2001:db8::/32"] }, not = { to_user = { prefix = ["9", "8"] } } }
final = true
[[rule]]
name = "emergency"
match = { any = [{ type = "emergency" }, { to_user = { in = ["110", "119"] } }] }
limit = { profile = "emergency", max = 5 }
final = true
[[rule]]
name = "gold"
match = { tier = "gold", account = { ne = "gx" } }
limit = { profile = "account", value = "gold:{account}", max = 20, overrides = { g1 = 2 } }
final = true
[[rule]]
name = "acct"
match = { account = { present = true, not_in = ["free"] } }
limit = { profile = "account", value = "{account}", max = 10, overrides = { a = 1, b = 0 } }
[[rule]]
name = "user"
limit = { profile = "user", value = "{from_user}@{from_domain}:{attrs.x}", max = 4 }
shadow = true
[[rule]]
name = "never"
match = { not = { any = [{ to_user = { regex = "" } }] } }
join = [{ profile = "local" }]
'''
RICH_RS = compile_sources([("rich.toml", RICH)])


@given(st.fixed_dictionaries({}, optional={
    "to_user": st.sampled_from(["112", "911", "110", "0044", "6002", "9", "", "8x"]),
    "account": st.sampled_from(["a", "b", "g1", "gx", "gold", "free", "", "zz"]),
    "src_ip": st.sampled_from(["10.1.1.1", "2001:db8::5", "192.0.2.1", "junk", ""]),
    "from_user": st.sampled_from(["6001", "", "x"]),
    "from_domain": st.sampled_from(["example.com", ""]),
    "attrs.x": st.sampled_from(["1", ""]),
}))
def test_generated_evaluator_matches_the_interpreter(req: dict[str, str]) -> None:
    """The generated fast evaluator gives exactly the interpreter's plan and attributes."""
    for rs in (RICH_RS, SHIPPED):
        fast = rs.evaluate(dict(req))
        ref = rs.interpret(dict(req))
        assert (fast.plan, fast.attrs) == (ref.plan, ref.attrs)


# -- rules that cannot lie (issue 10) -----------------------------------------------------------

CLASSIFY = '''
[[classify]]
attr = "type"
field = "to_user"
default = "local"
cases = [{ value = "emergency", regex = '^(112|911)$' }, { value = "international", regex = '^00' }]
[[classify]]
attr = "vip"
field = "account"
cases = [{ value = "yes", regex = "^vip-" }]
'''


@pytest.mark.parametrize("cond", [
    '{ type = "emergency" }',
    '{ type = { ne = "local" } }',
    '{ type = { in = ["emergency", "international"], not_in = ["local"] } }',
    '{ type = { regex = "^inter" } }',
    '{ type = { prefix = ["e", "zz"] } }',
    '{ vip = { present = false } }',
    '{ vip = { regex = "^$" } }',
])
def test_conditions_on_classify_values_that_exist_load(cond: str) -> None:
    """Values a classifier produces (and absence, when it has no default) are accepted."""
    rules(CLASSIFY + f'[[rule]]\nname = "r"\nmatch = {cond}\njoin = [{{ profile = "total" }}]\n')


@pytest.mark.parametrize(("cond", "key", "message"), [
    ('{ type = { eq = "emergancy" } }', "match.type.eq", "'emergancy' is not a value of 'type' (emergency, international, local)"),
    ('{ type = { ne = "intl" } }', "match.type.ne", "'intl' is not a value of 'type'"),
    ('{ type = { in = ["local", "lokal"] } }', "match.type.in", "'lokal' is not a value of 'type'"),
    ('{ any = [{ account = "a" }, { vip = "no" }] }', "match.any[1].vip", "'no' is not a value of 'vip' (yes)"),
    ('{ type = { present = false } }', "match.type.present", "can never hold: none of the values of 'type' (emergency, international, local) passes it"),
    ('{ vip = { regex = "^n" } }', "match.vip.regex", "can never hold: none of the values of 'vip' (yes, or absent) passes it"),
    ('{ type = { cidr = "10.0.0.0/8" } }', "match.type.cidr", "can never hold"),
])
def test_conditions_on_classify_values_that_never_come_are_errors(cond: str, key: str, message: str) -> None:
    """A value no case or default produces, or a test none of them passes, is a load error."""
    with pytest.raises(RuleError) as info:
        rules(CLASSIFY + f'[[rule]]\nname = "r"\nmatch = {cond}\njoin = [{{ profile = "total" }}]\n')
    assert info.value.key == key
    assert message in info.value.message


@pytest.mark.parametrize("match", ['{ not = {} }', '{ any = [{}] }', '{ all = [] }', '{ any = [] }',
                                   '{ all = [{ account = "a" }, {}] }', '{ not = { any = [{ not = {} }] } }'])
def test_empty_condition_tables_are_errors(match: str) -> None:
    """Empty all/any/not and empty condition tables are load errors, never silently true/false."""
    with pytest.raises(RuleError, match=r"key 'match\..*': is empty"):
        rules(f'[[rule]]\nname = "r"\nmatch = {match}\njoin = [{{ profile = "total" }}]\n')


@pytest.mark.parametrize("text", [
    "a = " + "[" * 3000 + "]" * 3000,
    "[[rule]]\nname = 'r'\nmatch = " + "{ not = " * 500 + "{ account = 'a' }" + " }" * 500 + "\n",
    '[[rule]]\nname = "r"\nmatch = { to_user = { regex = "(?P<a>x)(?P=b)" } }\n',
    "x = '\udcff'",
])
def test_pathological_files_are_rule_errors(text: str) -> None:
    """Deep nesting, odd regexes and unencodable text are load errors, not crashes."""
    with pytest.raises(RuleError):
        compile_sources([("p.toml", text)])
