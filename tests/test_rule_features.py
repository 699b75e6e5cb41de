"""Issue 12's rule features end to end, on both stores, over real sockets with a manual clock:
a schedule (peak and off-peak caps, and a night-only rule) as the clock moves, a cap taken from
the request (`max_from`) within its ceiling and with a bad value, and an overrides file a billing
system rewrites, picked up by the watcher without a restart."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.inproc import Served, serving

# 2023-11-13 is a Monday; the rules' clock is UTC
MONDAY_10H = 1_699_869_600.0  # 2023-11-13 10:00:00 UTC
MONDAY_21H = MONDAY_10H + 11 * 3600
MONDAY_23H = MONDAY_10H + 13 * 3600

RULES = """
[profiles]
with_value = ["account", "trunk", "plan"]

[[rule]]
name = "peak-cap"
match = { account = { present = true } }
limit = { profile = "account", value = "{account}", max = 3, schedule = [
  { days = "mon-fri", hours = "08:00-18:00", max = 1 },
] }
deny = { code = 486, reason = "Account call limit reached" }

[[rule]]
name = "night-international"
match = { to_user = { prefix = "00" } }
schedule = { hours = "22:00-06:00" }
limit = { profile = "account", value = "night-{account}", max = 0 }
deny = { code = 403, reason = "No international calls at night" }

[[rule]]
name = "trunk-channels"
match = { "attrs.trunk" = { present = true } }
limit = { profile = "trunk", value = "{attrs.trunk}", max = 1, max_from = "attrs.channels", ceiling = 3 }
deny = { code = 486, reason = "Trunk channels exhausted" }

[[rule]]
name = "plan-cap"
match = { "attrs.plan" = { present = true } }
limit = { profile = "plan", value = "{attrs.plan}", max = 1, overrides_file = "plans.csv" }
"""


@pytest.fixture(params=["embedded", "redis"])
async def served(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Served]:
    """The service on real sockets with these rules, on each store."""
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "features.toml").write_text(RULES)
    (rules / "plans.csv").write_text("value,max\ngold,2\n")
    kw: dict[str, Any] = {}
    if request.param == "redis":
        kw = {"store": request.getfixturevalue("redis_url"), "store_timeout": 0.5}
    async with serving(tmp_path, **kw) as s:
        yield s


def call(cid: str, account: str = "", to: str = "6002", **attrs: str) -> dict[str, Any]:
    msg: dict[str, Any] = {"call_id": cid, "from": f"sip:{cid}@x", "to": f"sip:{to}@x"}
    if account:
        msg["account"] = account
    if attrs:
        msg["attrs"] = attrs
    return msg


async def test_a_scheduled_cap_follows_the_clock(served: Served) -> None:
    """Monday 10:00 (peak): acme may hold 1 call; 21:00 (off-peak): 3, the peak call still up
    among them. A night-only rule refuses international calls at 23:00 and not at 10:00."""
    served.clock.set(MONDAY_10H)
    c = await served.tcp()
    assert (await c.call("check", **call("p1", "acme")))["decision"] == "allow"
    assert (await c.call("answer", call_id="p1"))["found"]  # up for the whole test (12 h lease)
    r = await c.call("check", **call("p2", "acme"))
    assert (r["decision"], r["rule"]) == ("deny", "peak-cap")
    assert [p["limit"] for p in r["profiles"] if p["rule"] == "peak-cap"] == [1]
    assert (await c.call("check", **call("i1", "beta", to="004930123")))["decision"] == "allow"
    served.clock.set(MONDAY_21H)  # off-peak: the cap is 3 again (p1 and two more)
    assert [(await c.call("check", **call(f"o{i}", "acme")))["decision"] for i in range(3)] == \
        ["allow", "allow", "deny"]
    served.clock.set(MONDAY_23H)
    r = await c.call("check", **call("i2", "beta", to="004930123"))
    assert (r["decision"], r["code"], r["rule"]) == ("deny", 403, "night-international")
    await c.close()


async def test_max_from_takes_the_proxys_count_within_the_ceiling(served: Served) -> None:
    """`attrs.channels` from the proxy sets the trunk's cap (2 here), never above the ceiling (3
    for a proxy saying 50), and a bad value falls back to the rule's max (1)."""
    c = await served.tcp()
    got = [(await c.call("check", **call(f"a{i}", trunk="t1", channels="2")))["decision"] for i in range(3)]
    assert got == ["allow", "allow", "deny"]
    got = [(await c.call("check", **call(f"b{i}", trunk="t2", channels="50")))["decision"] for i in range(4)]
    assert got == ["allow", "allow", "allow", "deny"]
    got = [(await c.call("check", **call(f"c{i}", trunk="t3", channels="lots")))["decision"] for i in range(2)]
    assert got == ["allow", "deny"]
    r = await c.call("check", **call("c9", trunk="t3", channels="lots"))
    assert [p["limit"] for p in r["profiles"] if p["profile"] == "trunk"] == [1]
    await c.close()


async def test_an_overrides_file_rewritten_is_picked_up_without_a_restart(served: Served) -> None:
    """plans.csv says gold may hold 2; the billing system rewrites it to 3 and the watcher
    reloads it (a new rules version), while the calls already held stay."""
    c = await served.tcp()
    assert [(await c.call("check", **call(f"g{i}", plan="gold")))["decision"] for i in range(3)] == \
        ["allow", "allow", "deny"]
    svc = served.service
    before = svc.ruleset.version
    svc.check_for_changes()  # the watcher's first look only records the files' state
    (served.rules / "plans.csv").write_text("value,max\ngold,3\nsilver,1\n")
    assert svc.check_for_changes() is True
    assert svc.ruleset.version != before and svc.reload_errors == 0
    assert (await c.call("check", **call("g9", plan="gold")))["decision"] == "allow"
    assert (await c.call("check", **call("g10", plan="gold")))["decision"] == "deny"
    assert await svc.store.profile_size("plan", "gold", served.clock.now()) == 3
    await c.close()
