"""Call rates (CPS) end to end: a rate rule through real sockets on both stores (an in-process
`Server` on a manual clock), the reply, tallies and log lines a rate denial gives, the debug
`decision_explained` line, each store's bucket housekeeping, and exactness with three
`callpolicy serve` processes hammering one Redis.

The store contract for rates (refill, burst, what takes no token) is in test_store_contract.py.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import hiredis
import pytest
from structlog.testing import capture_logs

from policy import decision
from policy.clock import ManualClock
from policy.rules import Ruleset, compile_sources
from policy.service import PolicyService
from policy.store.base import CallInfo, RateEntry, ReserveResult
from policy.store.embedded import EmbeddedStore
from tests.helpers import ROOT, LineClient, ServiceProcess
from tests.inproc import Served, serving
from tests.test_service import DownStore

RULES = """
[profiles]
no_value = ["total"]
with_value = ["account"]

[[rule]]
name = "count"
join = [{ profile = "total" }]

# at most 2 concurrent calls per account
[[rule]]
name = "account-cap"
match = { account = { present = true } }
limit = { profile = "account", value = "{account}", max = 2 }

# one new call per 10 s per account, bursts of 3 (slow: Redis buckets never expire mid-test)
[[rule]]
name = "account-cps"
match = { account = { present = true } }
rate = { value = "{account}", max = 1, per = 10, burst = 3 }

# per trunk (source address), its own answer
[[rule]]
name = "trunk-cps"
match = { src_ip = { present = true } }
rate = { value = "{src_ip}", max = 1, per = 10, burst = 1 }
deny = { code = 480, reason = "Trunk call rate exceeded" }

# shadow: would allow one call per 100 s platform-wide
[[rule]]
name = "platform-cps"
match = { to_user = { prefix = "00" } }
rate = { max = 1, per = 100, burst = 1 }
shadow = true
"""


def chk(cid: str, account: str | None = None, **kw: Any) -> dict[str, Any]:
    """A check message."""
    msg: dict[str, Any] = {"call_id": cid, "from": f"sip:{cid}@example.com", "to": "sip:2000@example.com", **kw}
    if account is not None:
        msg["account"] = account
    return msg


@pytest.fixture(params=["embedded", "redis"])
async def served(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Served]:
    """The service on real sockets with the rate rules, on each store."""
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "rates.toml").write_text(RULES)
    kw: dict[str, Any] = {}
    if request.param == "redis":
        kw = {"store": request.getfixturevalue("redis_url"), "store_timeout": 0.5}
    async with serving(tmp_path, **kw) as s:
        yield s


async def test_a_rate_denial_answers_the_rule_and_names_the_rate(served: Served) -> None:
    """Three calls pass the burst, the fourth is refused with 503 and the rate; ten seconds
    later one more passes; tallies count allow/deny for the rule; a refused call holds nothing."""
    c = await served.tcp()
    got = [await c.call("check", **chk(f"a{i}", "acme")) for i in range(2)]
    assert [r["decision"] for r in got] == ["allow", "allow"]
    assert got[0]["rates"] == [{"rule": "account-cps", "value": "acme", "rate": 0.1, "burst": 3, "tokens": 3.0}]
    for i in range(2):
        assert (await c.call("end", call_id=f"a{i}"))["released"]
    r = await c.call("check", **chk("a2", "acme"))
    assert r["decision"] == "allow" and r["rates"][0]["tokens"] == 1.0
    r = await c.call("check", **chk("a3", "acme"))
    assert (r["decision"], r["code"], r["reason"], r["rule"]) == ("deny", 503, "Call rate exceeded", "account-cps")
    assert r["rate"] == {"rule": "account-cps", "value": "acme", "rate": 0.1, "burst": 3}
    assert r["rates"][0]["tokens"] == 0.0 and "token" not in r
    size = await c.call("profile_size", profile="account", value="acme")
    assert size["size"] == 1  # a2 only: a3 joined nothing
    served.clock.advance(10)
    assert (await c.call("check", **chk("a4", "acme")))["decision"] == "allow"
    stats = await c.call("stats")
    assert stats["rules"]["account-cps"] == {"allow": 4, "deny": 1}
    assert stats["rules"]["account-cap"] == {"allow": 5}  # a3 was within the cap: its limit allowed it
    await c.close()


async def test_limit_and_rate_are_all_or_nothing(served: Served) -> None:
    """A call the concurrency cap refuses takes no token; one the rate refuses joins no profile."""
    c = await served.tcp()
    for cid in ("x1", "x2"):
        assert (await c.call("check", **chk(cid, "beta")))["decision"] == "allow"  # tokens 3 -> 1
    for cid in ("x3", "x4", "x5"):
        r = await c.call("check", **chk(cid, "beta"))
        assert (r["decision"], r["code"], r["rule"]) == ("deny", 486, "account-cap")
        assert r["rates"][0]["tokens"] == 1.0  # the cap refused: the token stays
    await c.call("end", call_id="x1")
    r = await c.call("check", **chk("x6", "beta"))
    assert r["decision"] == "allow" and r["rates"][0]["tokens"] == 1.0
    await c.call("end", call_id="x2")
    r = await c.call("check", **chk("x7", "beta"))
    assert (r["decision"], r["rule"]) == ("deny", "account-cps")
    assert (await c.call("profile_size", profile="account", value="beta"))["size"] == 1
    assert (await c.call("profile_size", profile="total"))["size"] == 1
    stats = await c.call("stats")
    assert stats["rules"]["account-cap"] == {"allow": 4, "deny": 3}
    assert stats["rules"]["account-cps"] == {"allow": 6, "deny": 1}  # a rule's rate counts once per check
    await c.close()


async def test_a_repeated_check_takes_no_token(served: Served) -> None:
    """A retransmitted or re-challenged INVITE (same Call-ID and From-tag) is the same call."""
    c = await served.tcp()
    first = await c.call("check", **chk("d1", "gamma", from_tag="ft"))
    assert first["decision"] == "allow"
    for _ in range(5):
        again = await c.call("check", **chk("d1", "gamma", from_tag="ft"))
        assert again["decision"] == "allow" and again["duplicate"] is True
    for cid in ("d2", "d3"):  # (one at a time: the cap is 2 and d1 holds one)
        r = await c.call("check", **chk(cid, "gamma"))
        assert r["decision"] == "allow"
        await c.call("end", call_id=cid)
    assert (await c.call("check", **chk("d4", "gamma")))["rule"] == "account-cps"
    stats = await c.call("stats")
    assert stats["rules"]["account-cps"] == {"allow": 3, "deny": 1}  # duplicates are not tallied
    await c.close()


async def test_a_rules_deny_gives_the_rates_answer(served: Served) -> None:
    """`deny` on a rule with a rate: its code and reason answer the rate's refusals."""
    c = await served.tcp()
    assert (await c.call("check", **chk("t1", src_ip="192.0.2.1")))["decision"] == "allow"
    r = await c.call("check", **chk("t2", src_ip="192.0.2.1"))
    assert (r["decision"], r["code"], r["reason"], r["rule"]) == ("deny", 480, "Trunk call rate exceeded",
                                                                  "trunk-cps")
    assert r["rate"] == {"rule": "trunk-cps", "value": "192.0.2.1", "rate": 0.1, "burst": 1}
    assert (await c.call("check", **chk("t3", src_ip="192.0.2.2")))["decision"] == "allow"  # another trunk
    await c.close()


async def test_a_shadow_rate_reports_and_never_refuses(served: Served) -> None:
    """The shadow rate's second call passes, listed in `shadow` and tallied as would_deny."""
    c = await served.tcp()
    with capture_logs() as logs:
        got = [await c.call("check", **chk(f"s{i}", to="sip:0044123@example.com")) for i in range(3)]
    assert [r["decision"] for r in got] == ["allow"] * 3
    assert got[0]["shadow"] == []
    for r in got[1:]:
        assert r["shadow"] == [{"rule": "platform-cps", "value": None, "rate": 0.01, "burst": 1}]
        assert r["rates"] == [{"rule": "platform-cps", "value": None, "rate": 0.01, "burst": 1, "shadow": True,
                               "tokens": 0.0}]
    assert [e["call_id"] for e in logs if e["event"] == "shadow_would_deny"] == ["s1", "s2"]
    stats = await c.call("stats")
    assert stats["rules"]["platform-cps"] == {"allow": 1, "would_deny": 2}
    await c.close()


async def test_the_decision_line_names_the_rate(served: Served) -> None:
    """The `decision` log line of a rate denial carries the rate and its bucket's tokens."""
    c = await served.tcp()
    with capture_logs() as logs:
        await c.call("check", **chk("l1", src_ip="198.51.100.1"))
        await c.call("check", **chk("l2", src_ip="198.51.100.1"))
    lines = [e for e in logs if e["event"] == "decision"]
    assert [(e["decision"], e.get("rule"), e.get("rate")) for e in lines] == [
        ("allow", None, None),
        ("deny", "trunk-cps", {"rule": "trunk-cps", "value": "198.51.100.1", "rate": 0.1, "burst": 1,
                               "tokens": 0.0})]
    await c.close()


async def test_dry_run_lists_the_rates_and_takes_no_token(served: Served) -> None:
    """A dry run shows the rates a call meets and their explanation; it takes no token."""
    c = await served.tcp()
    for _ in range(3):
        r = await c.call("check", dry_run=True, **chk("dr", src_ip="203.0.113.9"))
        assert r["dry_run"] is True and r["decision"] == "allow"
        assert r["rates"] == [{"rule": "trunk-cps", "value": "203.0.113.9", "rate": 0.1, "burst": 1}]
        [trunk] = [o for o in r["explain"] if o["rule"] == "trunk-cps"]
        assert trunk["rates"] == [{"value": "203.0.113.9", "rate": 0.1, "burst": 1}]
        assert trunk["caps"] == ["rate 203.0.113.9: 1 per 10 s, burst 1 (max)"]
    assert (await c.call("check", **chk("dr", src_ip="203.0.113.9")))["decision"] == "allow"
    await c.close()


async def test_a_reload_keeps_the_buckets(served: Served) -> None:
    """A reload keeps each (rule, value) bucket; a lower burst cuts it at the next check."""
    c = await served.tcp()
    assert (await c.call("check", **chk("r1", "zeta")))["rates"][0]["tokens"] == 3.0
    await c.call("end", call_id="r1")
    path = served.rules / "rates.toml"
    path.write_text(path.read_text().replace("max = 1, per = 10, burst = 3 }", "max = 1, per = 10, burst = 1 }"))
    assert (await c.call("reload"))["ok"]
    r = await c.call("check", **chk("r2", "zeta"))
    assert r["decision"] == "allow" and r["rates"][0] == {"rule": "account-cps", "value": "zeta", "rate": 0.1,
                                                          "burst": 1, "tokens": 1.0}  # 2 left, cut to 1
    await c.call("end", call_id="r2")
    assert (await c.call("check", **chk("r3", "zeta")))["rule"] == "account-cps"
    await c.close()


def uncommented_examples(text: str) -> list[str]:
    """The commented-out `[[rule]]` examples of a rule file, uncommented."""
    out: list[str] = []
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line == "# [[rule]]":
            block = []
            for more in lines[i:]:
                if not more.startswith("# "):
                    break
                block.append(more[2:])
            out.append("\n".join(block) + "\n")
    return out


def test_the_shipped_rules_show_a_rate_and_a_schedule_that_work() -> None:
    """rules/default.toml's commented rate and schedule examples compile as they are and do
    what their comments say; the shipped behaviour has no rate."""
    text = (ROOT / "rules" / "default.toml").read_text()
    examples = uncommented_examples(text)
    assert len(examples) == 2
    rs = compile_sources([("default.toml", text + "".join(examples))])
    cps, night = rs.by_name["account-cps"], rs.by_name["night-international"]
    assert cps.rate is not None and (cps.rate.max, cps.rate.per, cps.rate.burst) == (10, 1.0, 20)
    assert (cps.rate_code, cps.rate_reason) == (503, "Call rate exceeded")
    assert night.schedule and night.code == 403
    req = {"account": "acme", "to_user": "0044123", "from_user": "a", "from_domain": "x"}
    evening = 1_700_000_000.0 + 3600  # a Tuesday, 23:13 UTC
    assert [e.rule for e in rs.evaluate(dict(req), now=evening).rates] == ["account-cps"]
    assert "night-international" in [e.rule for e in rs.evaluate(dict(req), now=evening).plan]
    noon = evening - 11 * 3600
    assert "night-international" not in [e.rule for e in rs.evaluate(dict(req), now=noon).plan]
    shipped = compile_sources([("default.toml", text)])
    assert not shipped.uses_rates and not shipped.uses_time


# -- decision explanations (debug) ---------------------------------------------------------------


async def test_debug_explains_every_check(served: Served) -> None:
    """At debug level each check logs `decision_explained`: every rule, matched or not and why,
    with the caps and rates, next to the decision."""
    svc = served.service
    svc.explain_decisions = True
    c = await served.tcp()
    with capture_logs() as logs:
        await c.call("check", **chk("e1", "delta", src_ip="192.0.2.50"))
        await c.call("check", **chk("e2", src_ip="192.0.2.50"))
    lines = [e for e in logs if e["event"] == "decision_explained"]
    assert [(e["call_id"], e["decision"], e["rule"], e["log_level"]) for e in lines] == [
        ("e1", "allow", None, "debug"), ("e2", "deny", "trunk-cps", "debug")]
    first = {o["rule"]: o for o in lines[0]["explain"]}
    assert list(first) == ["count", "account-cap", "account-cps", "trunk-cps", "platform-cps"]
    assert first["account-cap"]["caps"] == ["account=delta: 2 (max)"]
    assert first["account-cps"]["caps"] == ["rate delta: 1 per 10 s, burst 3 (max)"]
    assert first["platform-cps"]["matched"] is False
    assert first["platform-cps"]["why"].startswith("not matched: to_user starts with")
    second = {o["rule"]: o for o in lines[1]["explain"]}
    assert second["account-cap"] == {"rule": "account-cap", "matched": False, "entries": [],
                                     "why": "not matched: account is present"}
    await c.close()


async def test_no_explanation_is_computed_when_debug_is_off(served: Served,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Off the hot path: with debug off, no explanation is built at all."""
    svc = served.service
    svc.explain_decisions = False
    calls = []
    real = Ruleset.explain

    def counting(self: Ruleset, *a: Any, **kw: Any) -> Any:
        calls.append(1)
        return real(self, *a, **kw)

    monkeypatch.setattr(Ruleset, "explain", counting)
    c = await served.tcp()
    with capture_logs() as logs:
        for i in range(5):
            await c.call("check", **chk(f"n{i}", "eps"))
    assert calls == [] and not [e for e in logs if e["event"] == "decision_explained"]
    svc.explain_decisions = True
    await c.call("check", **chk("n9", "eps"))
    assert calls == [1]
    await c.close()


def test_the_log_level_decides_whether_checks_are_explained(tmp_path: Path) -> None:
    """A real process: `--log-level debug` logs `decision_explained` for each check (JSON), the
    default info level none."""
    for level, expect in (("debug", 2), ("info", 0)):
        work = tmp_path / level
        work.mkdir()
        with ServiceProcess(workdir=work, extra=["--log-level", level]) as svc:
            c = svc.client()
            c.call("check", call_id="p1", **{"from": "sip:a@x.example", "to": "sip:112@x.example"})
            c.call("check", call_id="p2", account="acme", **{"from": "sip:b@x.example", "to": "sip:2@x.example"})
            c.close()
        lines = [e for e in svc.log_events() if e["event"] == "decision_explained"]
        assert len(lines) == expect, level
        if expect:
            assert lines[0]["level"] == "debug" and lines[0]["call_id"] == "p1"
            assert [o["rule"] for o in lines[0]["explain"] if o["matched"]] == ["count-all", "emergency"]
            assert lines[0]["explain"][1]["why"].endswith("(final: later rules skipped)")


# -- the store-down answer with rates --------------------------------------------------------------


async def test_a_rate_rule_fails_closed_when_the_store_is_down(tmp_path: Path) -> None:
    """Store down: an enforced rate or limit whose rule says `on_store_error = "deny"` (the
    default) gives 503 "Call policy store unavailable"; `allow` lets the call through; a shadow
    rate or a shadow limit never denies, even with `on_store_error = "deny"`."""
    rules = tmp_path / "r.toml"
    rules.write_text('[profiles]\nno_value = ["total"]\nwith_value = ["account"]\n'
                     '[[rule]]\nname = "closed"\nmatch = { account = "a" }\nrate = { max = 5 }\n'
                     '[[rule]]\nname = "open"\nmatch = { account = "b" }\nrate = { max = 5 }\n'
                     'on_store_error = "allow"\n'
                     '[[rule]]\nname = "shadowed"\nmatch = { account = "c" }\nrate = { max = 5 }\nshadow = true\n'
                     '[[rule]]\nname = "capped"\nmatch = { account = "d" }\n'
                     'limit = { profile = "account", value = "{account}", max = 5 }\n'
                     '[[rule]]\nname = "shadow-cap"\nmatch = { account = "e" }\n'
                     'limit = { profile = "account", value = "{account}", max = 5 }\nshadow = true\n'
                     'on_store_error = "deny"\n')
    svc = PolicyService(rules, DownStore(), clock=ManualClock())
    for account, rule in (("a", "closed"), ("d", "capped")):
        r = await svc.handle({"op": "check", **chk("1", account)})
        assert (r["decision"], r["code"], r["reason"], r["rule"]) == (
            "deny", 503, "Call policy store unavailable", rule), account
        assert r["store_error"] == "connection refused"
    for account in ("b", "c", "e"):
        r = await svc.handle({"op": "check", **chk("2", account)})
        assert r["decision"] == "allow" and r["store_error"] == "connection refused", account
        assert "code" not in r and "reason" not in r and "rule" not in r, account


def test_decide_merges_a_rules_limit_and_rate_tallies() -> None:
    """One tally per rule and check: deny beats would_deny beats allow."""
    rs = compile_sources([("t.toml", '[profiles]\nwith_value = ["account"]\n'
                                     '[[rule]]\nname = "r"\nlimit = { profile = "account", value = "{account}", '
                                     'max = 5 }\nrate = { value = "{account}", max = 1 }\n')])
    ev = rs.evaluate({"account": "a"})
    res = ReserveResult(False, False, None, [1], None, False, 0, [0.5])
    body, tallies = decision.decide(res, ev.plan, rs, rates=ev.rates)
    assert tallies == [("r", "deny")] and body["code"] == 503 and body["rule"] == "r"
    res = ReserveResult(False, False, 0, [5], None, False, 0, [0.5])
    body, tallies = decision.decide(res, ev.plan, rs, rates=ev.rates)
    assert tallies == [("r", "deny")] and body["code"] == 486  # both refused: the limit is named
    assert "rate" not in body


# -- the embedded store's buckets ------------------------------------------------------------------

T0 = 1_800_000_000.0


def rcall(cid: str) -> CallInfo:
    return CallInfo(cid, f"sip:{cid}@example.com", "sip:1@example.com", "acme")


async def test_embedded_forgets_buckets_once_full_again() -> None:
    """Idle buckets take no memory: a bucket is dropped once it would be full again."""
    s = EmbeddedStore()
    await s.start()
    for i in range(500):
        assert (await s.reserve(rcall(f"c{i}"), [], T0, 300, "t", rates=[RateEntry("r", f"v{i}", 2.0, 4)])).admitted
    assert s.info()["rate_buckets"] == 500
    await s.sweep(T0 + 0.4)
    assert s.info()["rate_buckets"] == 500  # 3 of 4 tokens: full at T0 + 0.5
    await s.sweep(T0 + 0.5)
    assert s.info()["rate_buckets"] == 0
    for i in range(3000):  # one busy key: the heap stays bounded
        await s.reserve(rcall(f"d{i}"), [], T0 + 1 + i, 300, "t", rates=[RateEntry("r", "busy", 2.0, 4)])
    assert s.info()["rate_buckets"] == 1 and len(s._bucket_heap) <= 2 + 1024 + 2
    await s.close()


async def test_embedded_restart_hands_out_no_fresh_burst(tmp_path: Path) -> None:
    """A restart right after a burst: the buckets start with what they gathered since the state
    was last written (here nothing), so the restart cannot double the burst; after a long
    downtime (old state files) they start full. (The clock is in the wall clock's base here: the
    files' times are.)"""
    clock = ManualClock(time.time())
    snap = tmp_path / "snapshot.json"
    rate = [RateEntry("r", "acme", 1.0, 5)]

    async def burst(store: EmbeddedStore, prefix: str) -> int:
        return sum([(await store.reserve(rcall(f"{prefix}{i}"), [], clock.now(), 300, "t", rates=rate)).admitted
                    for i in range(10)])

    s = EmbeddedStore(snapshot_path=snap, clock=clock.now, fsync_interval=0, snapshot_interval=0)
    await s.start()
    assert await burst(s, "a") == 5
    await s.close()
    s = EmbeddedStore(snapshot_path=snap, clock=clock.now, fsync_interval=0, snapshot_interval=0)
    await s.start()
    assert await burst(s, "b") == 0  # the files were written "now": no token gathered since
    clock.advance(2)
    assert await burst(s, "c") == 2
    await s.close()
    old = time.time() - 3600
    for f in tmp_path.iterdir():
        os.utime(f, (old, old))
    clock.set(time.time())
    s = EmbeddedStore(snapshot_path=snap, clock=clock.now, fsync_interval=0, snapshot_interval=0)
    await s.start()
    assert await burst(s, "d") == 5  # down for an hour: full buckets
    await s.close()


# -- the Redis store's buckets ---------------------------------------------------------------------


@pytest.mark.redis
async def test_redis_buckets_are_hashes_that_expire_when_full(redis_url: str) -> None:
    """`{P}:r:<rule>=<value>` holds tokens and time, with a PEXPIRE of its time to full + 1 s;
    a refused check writes nothing."""
    from policy.store.redis import RedisStore

    port = int(redis_url.rsplit(":", 1)[1].split("/")[0])

    def cmd(*args: str) -> Any:
        reader = hiredis.Reader(encoding="utf-8")
        with socket.create_connection(("127.0.0.1", port), timeout=2.0) as sock:
            sock.sendall(hiredis.pack_command(args))
            while (reply := reader.gets()) is False:
                reader.feed(sock.recv(65536))
        return reply

    s = RedisStore(redis_url, prefix="rt", timeout=0.5)  # no clock: no offset
    await s.start()
    try:
        rate = [RateEntry("acct-cps", "acme", 0.5, 3)]
        assert (await s.reserve(rcall("a"), [], T0, 300, "t", rates=rate)).admitted
        assert cmd("HGETALL", "{rt}:r:acct-cps=acme") == ["t", "2", "ts", "1800000000"]
        assert 2000 < cmd("PTTL", "{rt}:r:acct-cps=acme") <= 3000  # 1 token short at 0.5/s: 2 s, + 1 s
        whole = [RateEntry("platform", None, 100.0, 1)]
        assert (await s.reserve(rcall("b"), [], T0, 300, "t", rates=whole)).admitted
        assert 1000 < cmd("PTTL", "{rt}:r:platform") <= 1010
        cmd("PEXPIRE", "{rt}:r:platform", "100000")
        assert not (await s.reserve(rcall("c"), [], T0, 300, "t", rates=whole)).admitted
        assert cmd("PTTL", "{rt}:r:platform") > 99_000  # refused: the bucket was not written
        assert cmd("KEYS", "{rt}:r:*") == ["{rt}:r:acct-cps=acme", "{rt}:r:platform"] or \
            sorted(cmd("KEYS", "{rt}:r:*")) == ["{rt}:r:acct-cps=acme", "{rt}:r:platform"]
    finally:
        await s.close()


@pytest.mark.redis
async def test_an_undone_reserve_keeps_its_token(redis_url: str) -> None:
    """A reserve whose reply came too late is undone (the call released); its token is not handed
    back, so the bound holds whatever the proxy was told."""
    from policy.store.redis import RedisStore

    s = RedisStore(redis_url, prefix="ru", timeout=0.5)
    await s.start()
    try:
        rate = [RateEntry("cps", "acme", 0.1, 1)]
        assert (await s.reserve(rcall("late"), [], T0, 300, "tok-late", rates=rate)).admitted
        assert await s._pipe.call(s._undo_command("late", "tok-late")) == 1  # what the pipe sends
        assert await s.get_call("late", T0) is None
        r = await s.reserve(rcall("next"), [], T0, 300, "t", rates=rate)
        assert not r.admitted and r.rate_blocked == 0
    finally:
        await s.close()


# -- exactness across three instances on one Redis --------------------------------------------------

HAMMER_RULES = """
[profiles]
no_value = ["total"]

[[rule]]
name = "count"
join = [{ profile = "total" }]

[[rule]]
name = "hammer-cps"
match = { account = "hammer" }
rate = { value = "{account}", max = 20, per = 1, burst = 5 }
"""


@pytest.fixture
def three(redis_url: str, tmp_path: Path) -> Iterator[list[ServiceProcess]]:
    """Three `callpolicy serve` on one redis-server with the hammer rules (store timeout 0.5 s:
    this is about one truth, not about the 50 ms bound)."""
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "hammer.toml").write_text(HAMMER_RULES)
    text = (ROOT / "service.toml").read_text()
    assert "timeout = 0.05" in text
    cfg = tmp_path / "service.toml"
    cfg.write_text(text.replace("timeout = 0.05", "timeout = 0.5"))
    procs = [ServiceProcess(rules, store=redis_url, config=cfg) for _ in range(3)]
    try:
        for p in procs:
            p.start()
        yield procs
    finally:
        for p in procs:
            p.stop()


@pytest.mark.redis
def test_three_instances_never_pass_more_than_rate_times_window_plus_burst(three: list[ServiceProcess]) -> None:
    """20 calls/s, bursts of 5, hammered for ~3 s through three instances (two connections each):
    admissions <= 20 * elapsed + 5, and close to it (the bucket is never left idle long enough
    to overflow); every refusal is the rate's 503; the instances' tallies add up."""
    seconds = 3.0
    admitted: list[float] = []
    refused = 0
    other: list[dict[str, Any]] = []
    lock = threading.Lock()
    start = threading.Barrier(6)
    t_first: list[float] = []

    def hammer(svc: ServiceProcess, n: int) -> None:
        nonlocal refused
        c: LineClient = svc.client()
        start.wait()
        with lock:
            if not t_first:
                t_first.append(time.monotonic())
        end = t_first[0] + seconds
        i = 0
        try:
            while time.monotonic() < end:
                r = c.call("check", call_id=f"h{svc.port}-{n}-{i}", account="hammer",
                           **{"from": "sip:h@example.com", "to": "sip:2000@example.com"})
                got = time.monotonic()
                i += 1
                with lock:
                    if r.get("decision") == "allow":
                        admitted.append(got)
                    elif (r.get("decision"), r.get("code"), r.get("rule")) == ("deny", 503, "hammer-cps"):
                        refused += 1
                    else:
                        other.append(r)
        finally:
            c.close()

    threads = [threading.Thread(target=hammer, args=(svc, n)) for svc in three for n in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    elapsed = max(admitted) - t_first[0]
    assert not other, other[:3]
    assert refused > 3 * len(admitted), (refused, len(admitted))  # it was hammered well above the rate
    bound = 20 * elapsed + 5
    assert len(admitted) <= bound + 1, (len(admitted), elapsed)  # (+1: the instances' clock offsets)
    assert len(admitted) >= 0.75 * bound, (len(admitted), elapsed)
    # any window of admissions as the clients saw them (replies may lag by scheduling: 0.25 s)
    admitted.sort()
    for i in range(len(admitted)):
        for j in range(i + 1, len(admitted)):
            assert j - i + 1 <= 20 * (admitted[j] - admitted[i] + 0.25) + 5
    tallies = []
    for svc in three:
        c = svc.client()
        try:
            tallies.append(c.call("stats")["rules"].get("hammer-cps", {}))
        finally:
            c.close()
    assert sum(t.get("allow", 0) for t in tallies) == len(admitted)
    assert sum(t.get("deny", 0) for t in tallies) == refused
    assert all(t.get("allow", 0) > 0 for t in tallies)  # every instance admitted some

