"""A cap on the calls each proxy node / named client holds (issue 9: "an optional cap on calls
held per node/client"): the `node` field names where a check came from, so it is one rule."""

from __future__ import annotations

from pathlib import Path

from policy.settings import parse_tokens
from tests.inproc import authed, serving

NODE_CAP = """
[profiles]
with_value = ["node"]

[[rule]]
name = "node-cap"
limit = { profile = "node", value = "{node}", max = 2 }
deny = { code = 503, reason = "Too many calls from this proxy" }
"""

A = "kamailio-a-secret-0123456789"
B = "kamailio-b-secret-0123456789"
TOKENS = parse_tokens("test", "auth.tokens", [{"name": "kam-a", "role": "proxy", "secret": A},
                                              {"name": "kam-b", "role": "proxy", "secret": B}])


def check(cid: str) -> dict[str, str]:
    return {"call_id": cid, "from": f"sip:{cid}@x", "to": "sip:6002@x"}


async def test_each_named_client_has_its_own_cap(tmp_path: Path) -> None:
    """Two proxies with their own tokens: each gets 2 calls, the third from either is refused;
    the refused calls hold nothing; one proxy's end frees its own room only."""
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "default.toml").write_text(NODE_CAP)
    async with serving(tmp_path, tokens=TOKENS) as srv:
        a = await authed(await srv.tcp(), A)
        b = await authed(await srv.tcp(), B)
        got = [(await a.call("check", **check(f"a{i}")))["decision"] for i in range(3)]
        assert got == ["allow", "allow", "deny"]
        r = await b.call("check", **check("b0"))
        assert r["decision"] == "allow"
        assert [p for p in r["profiles"] if p["profile"] == "node"] == [
            {"profile": "node", "value": "kam-b", "size": 1, "limit": 2, "rule": "node-cap"}]
        r = await a.call("check", **check("a3"))
        assert (r["decision"], r["code"], r["reason"]) == ("deny", 503, "Too many calls from this proxy")
        store, now = srv.service.store, srv.clock.now()
        assert await store.profile_size("node", "kam-a", now) == 2
        assert await store.profile_size("node", "kam-b", now) == 1
        assert (await a.call("end", call_id="a0"))["released"]
        assert (await a.call("check", **check("a4")))["decision"] == "allow"
        for c in (a, b):
            await c.close()


async def test_anonymous_local_clients_share_no_node(tmp_path: Path) -> None:
    """Without a token (loopback, no auth configured) a check has an empty `node`: a rule keyed
    on it does not apply (a template with an empty field never applies), nothing is capped."""
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "default.toml").write_text(NODE_CAP)
    async with serving(tmp_path) as srv:
        c = await srv.tcp()
        assert [(await c.call("check", **check(f"x{i}")))["decision"] for i in range(4)] == ["allow"] * 4
        await c.close()
