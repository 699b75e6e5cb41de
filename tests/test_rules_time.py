"""Time in rules: schedules on rules and limits, the time fields, zones and daylight saving.

Time comes from the caller (`now=`, the service's injected clock): tests set it.
"""

from __future__ import annotations

import time
from datetime import datetime
from zoneinfo import ZoneInfo

import pytest

from policy.clock import ManualClock
from policy.errors import RuleError
from policy.rules import Ruleset, compile_sources
from policy.rules.schedule import LocalClock, Moment, Window

PROFILES = """
[profiles]
no_value = ["total", "intl", "night"]
with_value = ["account", "slot"]
"""


def at(y: int, mo: int, d: int, h: int = 0, mi: int = 0, s: int = 0, tz: str = "Europe/Berlin") -> float:
    """Epoch seconds of a local time."""
    return datetime(y, mo, d, h, mi, s, tzinfo=ZoneInfo(tz)).timestamp()


def rules(text: str) -> Ruleset:
    """Compile one file (profiles prepended)."""
    return compile_sources([("t.toml", PROFILES + text)])


def plan(rs: Ruleset, now: float, **req: str) -> list[tuple[str, str | None, int | None]]:
    """The plan's (profile, value, limit), checked against the interpreter."""
    fast = rs.evaluate(dict(req), now=now)
    ref = rs.interpret(dict(req), now=now)
    assert (fast.plan, fast.attrs) == (ref.plan, ref.attrs)
    return [(e.profile, e.value, e.limit) for e in fast.plan]


# 2024-03-08 is a Friday.
FRI = (2024, 3, 8)
SAT = (2024, 3, 9)


NIGHT = '''
[time]
tz = "Europe/Berlin"
[[rule]]
name = "friday-night"
schedule = { days = "fri", hours = "22:00-06:00" }
join = [{ profile = "night" }]
'''


@pytest.mark.parametrize(("when", "inside"), [
    ((*FRI, 21, 59), False),
    ((*FRI, 22, 0), True),
    ((*FRI, 23, 59), True),
    ((*SAT, 0, 0), True),
    ((*SAT, 5, 59), True),
    ((*SAT, 6, 0), False),
    ((*SAT, 22, 30), False),  # Saturday night is not Friday night
    ((2024, 3, 7, 23, 0), False),  # nor Thursday night
    ((2024, 3, 7, 3, 0), False),  # Thursday 03:00 is Wednesday night
])
def test_a_window_that_wraps_midnight_belongs_to_the_day_it_starts(when: tuple[int, ...], inside: bool) -> None:
    """fri 22:00-06:00 holds from Friday 22:00 to Saturday 06:00 (end exclusive)."""
    rs = rules(NIGHT)
    assert bool(plan(rs, at(*when))) is inside


def test_rule_schedule_in_another_zone() -> None:
    """A window's tz is its own: 09:00-17:00 New York is 14:00-22:00 Berlin on 2024-03-11 (EDT, CET)."""
    rs = rules('''
[time]
tz = "Europe/Berlin"
[[rule]]
name = "ny-office"
schedule = { days = "mon-fri", hours = "09:00-17:00", tz = "America/New_York" }
join = [{ profile = "total" }]
''')
    assert plan(rs, at(2024, 3, 11, 13, 59)) == []
    assert plan(rs, at(2024, 3, 11, 14, 0)) == [("total", None, None)]
    assert plan(rs, at(2024, 3, 11, 21, 59)) == [("total", None, None)]
    assert plan(rs, at(2024, 3, 11, 22, 0)) == []


def test_schedule_array_is_any_window_and_days_ranges_wrap() -> None:
    """Several windows: inside any; 'sat-mon' is sat, sun, mon."""
    rs = rules('''
[[rule]]
name = "offpeak"
schedule = [{ days = "sat-mon" }, { hours = ["00:00-07:00", "20:00-24:00"] }]
join = [{ profile = "total" }]
''')
    utc = {"tz": "UTC"}
    assert plan(rs, at(2024, 3, 11, 12, **utc))  # Monday
    assert not plan(rs, at(2024, 3, 12, 12, **utc))  # Tuesday noon
    assert plan(rs, at(2024, 3, 12, 6, 59, **utc))
    assert plan(rs, at(2024, 3, 12, 20, 0, **utc))
    assert plan(rs, at(2024, 3, 12, 23, 59, 59, **utc))


def test_limit_schedule_gives_peak_and_offpeak_caps() -> None:
    """The first window the time is in gives the cap; outside all of them, max."""
    rs = rules('''
[time]
tz = "Europe/Berlin"
[[rule]]
name = "cap"
limit = { profile = "account", value = "{account}", max = 10, schedule = [
  { days = "mon-fri", hours = "08:00-18:00", max = 20 },
  { days = "mon-sun", hours = "22:00-06:00", max = 2 },
] }
''')
    assert plan(rs, at(*FRI, 12), account="a") == [("account", "a", 20)]
    assert plan(rs, at(*FRI, 19), account="a") == [("account", "a", 10)]
    assert plan(rs, at(*SAT, 12), account="a") == [("account", "a", 10)]
    assert plan(rs, at(*SAT, 3), account="a") == [("account", "a", 2)]
    why = rs.explain({"account": "a"}, now=at(*SAT, 3))[0]["caps"]
    assert why == ["account=a: 2 (schedule every day 22:00-06:00 (Europe/Berlin), local time sat 03:00 Europe/Berlin)"]
    why = rs.explain({"account": "a"}, now=at(*SAT, 12))[0]["caps"]
    assert why == ["account=a: 10 (max: outside every schedule window, local time sat 12:00 Europe/Berlin)"]


def test_scheduled_cap_on_a_no_value_profile() -> None:
    """A no-value profile with a scheduled cap is built per call (not a prebuilt entry)."""
    rs = rules('''
[[rule]]
name = "night-intl"
match = { to_user = { prefix = "00" } }
limit = { profile = "intl", max = 50, schedule = { hours = "22:00-06:00", max = 0 } }
''')
    assert plan(rs, at(*FRI, 23, tz="UTC"), to_user="0044") == [("intl", None, 0)]
    assert plan(rs, at(*FRI, 12, tz="UTC"), to_user="0044") == [("intl", None, 50)]


def test_time_fields_in_match_templates_and_classify() -> None:
    """hour, weekday and time are fields in the rules' zone; usable everywhere a field is."""
    rs = rules('''
[time]
tz = "Asia/Kathmandu"
[[classify]]
attr = "period"
field = "hour"
default = "offpeak"
cases = [{ value = "peak", regex = "^(0[8-9]|1[0-7])$" }]
[[rule]]
name = "weekend"
match = { weekday = { in = ["sat", "sun"] } }
join = [{ profile = "total" }]
[[rule]]
name = "slot"
match = { time = { regex = "^..:[0-2]" } }
join = [{ profile = "slot", value = "{weekday}-{hour}-{period}" }]
''')
    now = at(*SAT, 9, 15, tz="Asia/Kathmandu")  # +05:45
    ev = rs.evaluate({}, now=now)
    assert ev.attrs == {"hour": "09", "weekday": "sat", "time": "09:15", "period": "peak"}
    assert plan(rs, now) == [("total", None, None), ("slot", "sat-09-peak", None)]
    assert plan(rs, at(*FRI, 18, 45, tz="Asia/Kathmandu")) == []


def test_time_is_computed_only_when_rules_use_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rules without time never read the clock, set no time fields and ignore now."""
    rs = rules('[[rule]]\nname = "r"\njoin = [{ profile = "total" }]\n')
    assert not rs.uses_time
    assert "now" not in rs.source.split("\n", 1)[1]
    monkeypatch.setattr(time, "time", lambda: pytest.fail("read the clock"))
    ev = rs.evaluate({"account": "a"})
    assert ev.attrs == {}
    assert rs.interpret({"account": "a"}).attrs == {}


def test_now_none_reads_the_wall_clock() -> None:
    """The old call form evaluate(req) still works with time rules: the wall clock."""
    rs = rules('[[rule]]\nname = "r"\nschedule = { days = "mon-sun" }\njoin = [{ profile = "total" }]\n'
               '[[rule]]\nname = "h"\nmatch = { hour = { regex = "." } }\njoin = [{ profile = "intl" }]\n')
    assert rs.uses_time
    assert [e.profile for e in rs.evaluate({}).plan] == ["total", "intl"]
    assert [e.profile for e in rs.interpret({}).plan] == ["total", "intl"]
    assert rs.evaluate({}).attrs["weekday"] == datetime.now(ZoneInfo("UTC")).strftime("%a").lower()


def test_a_manual_clock_moves_the_rules() -> None:
    """The service passes its injected clock's now: moving the clock moves the decision."""
    rs = rules(NIGHT)
    clock = ManualClock(at(*FRI, 21, 59, 30))
    assert plan(rs, clock.now()) == []
    clock.advance(30)
    assert plan(rs, clock.now()) == [("night", None, None)]
    clock.advance(8 * 3600 - 1)
    assert plan(rs, clock.now()) == [("night", None, None)]
    clock.advance(1)
    assert plan(rs, clock.now()) == []


def test_daylight_saving_days() -> None:
    """Windows follow the wall clock: 02:00-03:00 does not exist on the spring day and happens
    twice on the autumn day."""
    rs = rules('[time]\ntz = "Europe/Berlin"\n[[rule]]\nname = "r"\nschedule = { hours = "02:00-03:00" }\n'
               'join = [{ profile = "total" }]\n')
    spring = at(2024, 3, 31, 1, 59)
    assert plan(rs, spring) == []
    assert plan(rs, spring + 60) == []  # 03:00 CEST
    autumn = datetime(2024, 10, 27, 0, 30, tzinfo=ZoneInfo("UTC")).timestamp()  # 02:30 CEST
    assert plan(rs, autumn) == [("total", None, None)]
    assert plan(rs, autumn + 3600) == [("total", None, None)]  # 02:30 CET, again
    assert plan(rs, autumn + 7200) == []  # 03:30 CET


def transitions(zone: ZoneInfo, start: float, end: float) -> list[float]:
    """The instants (to the second) where the zone's UTC offset changes between start and end."""
    def off(t: float) -> object:
        return datetime.fromtimestamp(t, zone).utcoffset()

    out = []
    t = start
    while t < end:
        if off(t) != off(t + 3600):
            lo, hi = t, t + 3600
            while hi - lo > 1:
                mid = (lo + hi) // 2
                lo, hi = (mid, hi) if off(mid) == off(lo) else (lo, mid)
            out.append(hi)
        t += 3600
    return out


@pytest.mark.parametrize("tz", ["UTC", "Europe/Berlin", "Australia/Lord_Howe", "Asia/Kathmandu",
                                "America/St_Johns", "Africa/Monrovia", "Pacific/Chatham"])
def test_local_clock_agrees_with_datetime_around_transitions(tz: str) -> None:
    """The generated evaluator's cached minute of the week equals the datetime one, every 7.5 s
    across each 2024 transition (and Monrovia's 1972 one from -0:44:30), forwards and backwards."""
    zone = ZoneInfo(tz)
    clock = LocalClock(zone)
    points = transitions(zone, at(2024, 1, 1, tz="UTC"), at(2025, 1, 1, tz="UTC"))
    points += [*transitions(zone, at(1972, 1, 1, tz="UTC"), at(1972, 2, 1, tz="UTC")), 0.0, 1e9 + 0.999]
    assert tz == "UTC" or len(points) > 2 or tz == "Asia/Kathmandu"
    for point in points:
        seconds = [point - 300 + i * 7.5 + 0.25 for i in range(80)]
        for now in seconds + seconds[::-1] + seconds[::3]:
            dt = Moment(now).local(tz, zone)
            assert clock(now) == dt.weekday() * 1440 + dt.hour * 60 + dt.minute, (tz, now)


def test_window_table_equals_the_reference() -> None:
    """A window's minute-of-week table is built from its ranges; `contains` decides directly."""
    for days, ranges in [(frozenset({4}), ((1320, 360),)), (frozenset({6}), ((1380, 60), (600, 660))),
                         (frozenset(range(7)), ((0, 1440),)), (frozenset({0, 2}), ((0, 1),)),
                         (frozenset({1}), ((1439, 1440),))]:
        w = Window.make(days, ranges, "UTC", ZoneInfo("UTC"))
        assert all(w.week[m] == w.contains(m // 1440, m % 1440) for m in range(7 * 1440))


def test_time_zone_set_in_two_files_is_an_error() -> None:
    """[time] is set once for all the rule files."""
    with pytest.raises(RuleError, match=r"b\.toml: key 'time\.tz': the time zone is already set in a\.toml"):
        compile_sources([("a.toml", '[time]\ntz = "UTC"\n'), ("b.toml", '[time]\ntz = "UTC"\n')])


def test_schedule_without_tz_uses_the_time_table_of_any_file() -> None:
    """Schedules without tz use [time] tz even when it is set in a later file."""
    a = PROFILES + '[[rule]]\nname = "r"\nschedule = { hours = "08:00-09:00" }\njoin = [{ profile = "total" }]\n'
    rs = compile_sources([("a.toml", a), ("b.toml", '[time]\ntz = "Asia/Tokyo"\n')])
    assert rs.tz == "Asia/Tokyo"
    assert plan(rs, at(*FRI, 8, 30, tz="Asia/Tokyo")) == [("total", None, None)]
    assert plan(rs, at(*FRI, 8, 30, tz="UTC")) == []


def test_explain_a_scheduled_rule_gives_the_local_time() -> None:
    """Why a scheduled rule did or did not apply names the window and the local time."""
    rs = rules(NIGHT)
    out = rs.explain({}, now=at(*SAT, 12))
    assert out == [{"rule": "friday-night", "matched": False, "entries": [],
                    "why": "not matched: time in fri 22:00-06:00 (Europe/Berlin) [local time sat 12:00 Europe/Berlin]"}]
