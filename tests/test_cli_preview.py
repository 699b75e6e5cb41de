"""The caps in force now (`policy.caps`) and the reload preview (`policy.preview`): pure tests, then
against a live `callpolicy serve` with calls held (`check-rules --against-live`, `reload`, the log)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

from policy.caps import profile_caps
from policy.preview import Preview
from policy.rules import Ruleset, compile_sources
from tests.helpers import ROOT, ServiceProcess

PROFILES = '[profiles]\nno_value = ["total"]\nwith_value = ["account"]\n'
#: Monday 2026-11-30 10:00 UTC (inside mon-fri 08:00-18:00) and Sunday 2026-11-29 10:00 UTC (outside)
MONDAY = datetime(2026, 11, 30, 10, 0, tzinfo=UTC).timestamp()
SUNDAY = datetime(2026, 11, 29, 10, 0, tzinfo=UTC).timestamp()


def rs(text: str) -> Ruleset:
    return compile_sources([("r/rules.toml", PROFILES + text)])


def test_caps_override_schedule_max_and_the_smallest_rule() -> None:
    """A key's cap: the override for the value, else the schedule window in force, else max; the
    smallest over the enforced rules limiting the profile, naming the rule and why."""
    r = rs('''
[[rule]]
name = "wide"
[rule.limit]
profile = "account"
value = "{account}"
max = 10
overrides = { acme = 3, big = 50 }
schedule = [{ days = "mon-fri", hours = "08:00-18:00", max = 20 }]
[[rule]]
name = "narrow"
limit = { profile = "account", value = "{account}", max = 30, overrides = { big = 40 } }
[[rule]]
name = "all"
limit = { profile = "total", max = 100 }
''')
    weekday = profile_caps(r, MONDAY)["account"]
    assert weekday.limit_for("other") == 20 and weekday.cap_for("other").rule == "wide"  # type: ignore[union-attr]
    assert "schedule mon-fri 08:00-18:00" in weekday.cap_for("other").how  # type: ignore[union-attr]
    assert weekday.limit_for("acme") == 3 and "override for 'acme'" in weekday.cap_for("acme").how  # type: ignore[union-attr]
    assert weekday.limit_for("big") == 40 and weekday.cap_for("big").rule == "narrow"  # type: ignore[union-attr]
    sunday = profile_caps(r, SUNDAY)["account"]
    assert sunday.limit_for("other") == 10 and "outside every schedule window" in sunday.cap_for("other").how  # type: ignore[union-attr]
    assert profile_caps(r, SUNDAY)["total"].cap_for(None).limit == 100  # type: ignore[union-attr]


def test_caps_shadow_max_from_and_rule_schedules() -> None:
    """Shadow rules count only when no enforced rule limits the profile; a max_from limit is taken
    at the cap of a call without the field, and flagged; a rule outside its own schedule gives no cap."""
    r = rs('''
[[rule]]
name = "shadow-total"
limit = { profile = "total", max = 2 }
shadow = true
[[rule]]
name = "per-call"
limit = { profile = "account", value = "{account}", max = 10, max_from = "attrs.channels", ceiling = 50 }
[[rule]]
name = "nights"
schedule = { hours = "22:00-06:00" }
limit = { profile = "account", value = "{account}", max = 1 }
''')
    caps = profile_caps(r, MONDAY)  # 10:00: "nights" is not in force
    assert caps["total"].shadow and caps["total"].default == 2
    acct = caps["account"].cap_for("x")
    assert acct is not None and (acct.limit, acct.rule, acct.per_call) == (10, "per-call", "attrs.channels")
    assert "calls that carry attrs.channels may have another cap" in acct.describe()
    night = datetime(2026, 11, 30, 23, 0, tzinfo=UTC).timestamp()
    assert profile_caps(r, night)["account"].cap_for("x").rule == "nights"  # type: ignore[union-attr]


def test_preview_lists_keys_over_their_cap_most_over_first_bounded() -> None:
    """Over = size > cap (a full key is not over); the list keeps the most over, the counts count all."""
    r = rs('''
[[rule]]
name = "cap"
limit = { profile = "account", value = "{account}", max = 5, overrides = { acme = 1 } }
[[rule]]
name = "all"
limit = { profile = "total", max = 100 }
''')
    pv = Preview(r, MONDAY, max_items=3)
    assert pv.whole_profiles() == ["total"] and pv.value_profiles() == ["account"]
    pv.add("total", None, 100)  # full, not over
    pv.add_values("account", [("acme", 2), ("full", 5), *((f"a{i}", 6 + i) for i in range(10))])
    res = pv.finish()
    assert res.count == 11 and res.calls_over == 1 + sum(1 + i for i in range(10)) and res.keys == 13
    assert [(o.key, o.size, o.cap.limit, o.over) for o in res.over] == [
        ("account=a9", 15, 5, 10), ("account=a8", 14, 5, 9), ("account=a7", 13, 5, 8)]
    assert res.truncated and res.to_json()["over_limit"][0] == {
        "profile": "account", "value": "a9", "size": 15, "limit": 5, "over": 10, "rule": "cap", "how": "max"}
    text = "\n".join(res.lines())
    assert "11 profile key(s) over their cap by 56 call(s)" in text and "... and 8 more" in text
    empty = Preview(r, MONDAY)
    empty.add("total", None, 3)
    assert empty.finish().lines() == ["no profile key over its cap (1 keys looked at)"]


# -- against a live service ------------------------------------------------------------------------


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "policy", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=60, check=False)


@pytest.fixture
def live(tmp_path: Path) -> ServiceProcess:
    """A service on a copy of the shipped rules, with 8 calls of account zeta, 2 of acme (cap 3)
    and one call in each of 60 accounts a00..a59 held."""
    rules = tmp_path / "rules"
    shutil.copytree(ROOT / "rules", rules)
    cfg = tmp_path / "service.toml"
    cfg.write_text("[metrics]\nlisten = false\n[rules]\nwatch = false\n")
    svc = ServiceProcess(rules, workdir=tmp_path, config=cfg).start()
    c = svc.client()
    calls = [("zeta", i) for i in range(8)] + [("acme", i) for i in range(2)] + [(f"a{i:02d}", 0) for i in range(60)]
    for acct, i in calls:
        r = c.call("check", call_id=f"{acct}-{i}", account=acct, **{"from": f"sip:{acct}{i}@x"}, to="sip:6002@x")
        assert r["decision"] == "allow", r
    c.close()
    yield svc  # type: ignore[misc]
    svc.stop()


def tighten(rules: Path, cap: int, acme: int) -> None:
    """The account cap and acme's override, edited as an operator would."""
    default = rules / "default.toml"
    default.write_text(re.sub(r'value = "\{account\}", max = \d+', f'value = "{{account}}", max = {cap}',
                              default.read_text()))
    (rules / "account-limits.toml").write_text(f"[overrides.account-cap]\nacme = {acme}\n")


def test_check_rules_against_live_then_reload_logs_the_same(live: ServiceProcess) -> None:
    """`check-rules --against-live` lists what the running service holds over the new caps; the
    `reload` that follows answers and logs the same summary (bounded), and nothing is released."""
    srv = f"127.0.0.1:{live.port}"
    rules = Path(live.rules)
    r = cli("check-rules", str(rules), "--against-live", "--server", srv)
    assert r.returncode == 0 and "no profile key over its cap" in r.stdout, r.stdout + r.stderr
    tighten(rules, cap=5, acme=1)
    r = cli("check-rules", str(rules), "--against-live", "--server", srv, "--top", "5")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "2 profile key(s) over their cap by 4 call(s) in all" in out, out
    assert "account=zeta: 8 calls, cap 5, over by 3  (rule account-cap: max)" in out
    assert "account=acme: 2 calls, cap 1, over by 1  (rule account-cap: override for 'acme'" in out
    r = cli("reload", "--server", srv)
    assert r.returncode == 0 and r.stdout.startswith("reloaded: version")
    assert "account=zeta: 8 calls, cap 5, over by 3" in r.stdout and "account=acme: 2 calls, cap 1" in r.stdout
    [ev] = [e for e in live.log_events() if e.get("event") == "reload_preview"]
    assert ev["level"] == "warning" and ev["over"] == 2 and ev["calls_over"] == 4
    assert [(o["value"], o["size"], o["limit"], o["over"]) for o in ev["over_limit"]] == [("zeta", 8, 5, 3),
                                                                                      ("acme", 2, 1, 1)]
    c = live.client()
    assert c.call("profile_size", profile="account", value="zeta")["size"] == 8  # nothing cut
    assert c.call("check", call_id="z-new", account="zeta", **{"from": "sip:z@x"}, to="sip:1@x")["decision"] == "deny"
    c.close()
    # a cap of 0: all 62 keys are over; the log line stays bounded, the reply and the CLI say how many more
    tighten(rules, cap=0, acme=0)
    r = cli("check-rules", str(rules), "--against-live", "--server", srv, "--top", "5")
    assert "62 profile key(s) over their cap by 70 call(s) in all" in r.stdout and "... and 57 more" in r.stdout
    assert r.stdout.count(", over by ") == 5  # five keys listed
    assert cli("reload", "--server", srv).returncode == 0
    last = [e for e in live.log_events() if e.get("event") == "reload_preview"][-1]
    assert last["over"] == 62 and len(last["over_limit"]) == 20 and last["truncated"] is True
    assert last["over_limit"][0]["value"] == "zeta"  # the most over first


def test_against_live_with_a_new_profile_and_json(live: ServiceProcess) -> None:
    """A profile the running rules do not have holds nothing yet (no error); --json keeps numbers."""
    rules = Path(live.rules)
    default = rules / "default.toml"
    text = default.read_text().replace('with_value = ["user", "account", "type"]',
                                       'with_value = ["user", "account", "type", "trunk"]')
    default.write_text(text + '\n[[rule]]\nname = "trunk-cap"\nlimit = { profile = "trunk", value = "{account}", '
                              'max = 1 }\n')
    r = cli("check-rules", str(rules), "--against-live", "--server", f"127.0.0.1:{live.port}", "--json")
    assert r.returncode == 0, r.stderr
    import orjson

    body = orjson.loads(r.stdout)
    assert body["preview"]["count"] == 0 and "skipped" not in body["preview"]
