"""The service through real sockets, in-process so a manual clock drives leases (no sleeping)."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
from structlog.testing import capture_logs

from policy.clock import ManualClock
from policy.errors import StoreError
from policy.server import Server
from policy.service import PolicyService
from policy.settings import Settings
from policy.store.embedded import EmbeddedStore
from tests.helpers import free_port

ROOT = Path(__file__).resolve().parent.parent


class AClient:
    """An asyncio line-JSON client."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def tcp(cls, port: int) -> AClient:
        """Connect over TCP."""
        return cls(*await asyncio.open_connection("127.0.0.1", port))

    @classmethod
    async def unix(cls, path: str) -> AClient:
        """Connect over a Unix socket."""
        return cls(*await asyncio.open_unix_connection(path))

    async def send(self, data: dict[str, Any] | bytes) -> None:
        """Send a request (dict as a JSON line) or raw bytes."""
        self.writer.write(data if isinstance(data, bytes) else orjson.dumps(data) + b"\n")
        await self.writer.drain()

    async def recv(self) -> dict[str, Any]:
        """One line reply."""
        line = await asyncio.wait_for(self.reader.readline(), 5)
        assert line, "connection closed"
        reply: dict[str, Any] = orjson.loads(line)
        return reply

    async def call(self, op: str, **fields: Any) -> dict[str, Any]:
        """One request, one reply."""
        await self.send({"op": op, **fields})
        return await self.recv()

    async def close(self) -> None:
        """Close."""
        self.writer.close()


@dataclass
class Running:
    """An in-process service and its manual clock."""

    server: Server
    clock: ManualClock
    port: int
    rules: Path
    unix: str

    @property
    def service(self) -> PolicyService:
        """The service."""
        assert self.server.service is not None
        return self.server.service

    async def client(self) -> AClient:
        """A TCP client."""
        return await AClient.tcp(self.port)


@pytest.fixture
async def running(tmp_path: Path) -> AsyncIterator[Running]:
    """The shipped rules (copied, so tests may edit them) on a real TCP/UDP/Unix listener."""
    rules = tmp_path / "rules"
    shutil.copytree(ROOT / "rules", rules)
    port = free_port()
    settings = Settings(tcp=f"127.0.0.1:{port}", udp=f"127.0.0.1:{port}", unix=str(tmp_path / "s.sock"),
                        rules=str(rules), snapshot=str(tmp_path / "snap.json"), watch=False, metrics=None,
                        base_dir=tmp_path)
    clock = ManualClock()
    server = Server(settings, clock=clock)
    await server.start()
    yield Running(server, clock, port, rules, str(tmp_path / "s.sock"))
    await server.stop()


def chk(call_id: str, to: str = "6002", user: str = "6001", account: str | None = "acme",
        **extra: Any) -> dict[str, Any]:
    """A check request."""
    msg: dict[str, Any] = {"call_id": call_id, "from": f"sip:{user}@example.com", "to": f"sip:{to}@example.com"}
    if account is not None:
        msg["account"] = account
    msg.update(extra)
    return msg


async def size(c: AClient, profile: str, value: str | None = None) -> int:
    """profile_size over the wire."""
    r = await c.call("profile_size", profile=profile, value=value)
    assert r["ok"], r
    n: int = r["size"]
    return n


# -- the shipped example rules ---------------------------------------------------------------


async def test_account_acme_cap_is_3(running: Running) -> None:
    """acme: 3 calls at once (users differ so the user cap is not what bites); the 4th gets 486."""
    c = await running.client()
    for i in range(3):
        r = await c.call("check", **chk(f"a{i}", user=f"u{i}"))
        assert r["ok"] and r["decision"] == "allow", r
    r = await c.call("check", **chk("a3", user="u3"))
    assert (r["decision"], r["code"], r["reason"], r["rule"]) == (
        "deny", 486, "Account call limit reached", "account-cap")
    limiting = next(p for p in r["profiles"] if p["rule"] == "account-cap")
    assert limiting == {"profile": "account", "value": "acme", "size": 3, "limit": 3, "rule": "account-cap"}
    assert await size(c, "account", "acme") == 3
    assert await size(c, "total") == 3
    await c.close()


async def test_other_accounts_cap_is_10(running: Running) -> None:
    """Any other account: 10 at once."""
    c = await running.client()
    results = [await c.call("check", **chk(f"b{i}", user=f"u{i}", account="beta")) for i in range(11)]
    assert [r["decision"] for r in results] == ["allow"] * 10 + ["deny"]
    assert results[-1]["rule"] == "account-cap"
    await c.close()


async def test_user_cap_is_4(running: Running) -> None:
    """One user (from user@domain): 4 at once, the 5th gets 486 User call limit reached."""
    c = await running.client()
    results = [await c.call("check", **chk(f"u{i}", user="6001", account=f"acc{i}")) for i in range(5)]
    assert [r["decision"] for r in results] == ["allow"] * 4 + ["deny"]
    assert (results[-1]["code"], results[-1]["reason"], results[-1]["rule"]) == (
        486, "User call limit reached", "user-cap")
    assert await size(c, "user", "6001@example.com") == 4
    await c.close()


async def test_calls_without_account_skip_the_account_cap(running: Running) -> None:
    """No account: no account profile, the user cap still applies."""
    c = await running.client()
    r = await c.call("check", **chk("n1", account=None))
    assert r["decision"] == "allow"
    assert {p["profile"] for p in r["profiles"]} == {"total", "type", "local", "user"}
    await c.close()


async def test_emergency_cap_is_5_and_ignores_account_caps(running: Running) -> None:
    """Emergency calls: 5 at once, 6th gets 503; an account at its cap still reaches emergency."""
    c = await running.client()
    for i in range(3):
        assert (await c.call("check", **chk(f"a{i}", user=f"u{i}")))["decision"] == "allow"
    for i in range(5):
        r = await c.call("check", **chk(f"e{i}", to="112", user="6001"))
        assert r["decision"] == "allow", r
        assert {p["profile"] for p in r["profiles"]} == {"total", "type", "emergency"}
    r = await c.call("check", **chk("e5", to="911"))
    assert (r["decision"], r["code"], r["reason"], r["rule"]) == (
        "deny", 503, "Emergency capacity exhausted", "emergency")
    assert await size(c, "emergency") == 5
    assert await size(c, "type", "emergency") == 5
    assert await size(c, "account", "acme") == 3
    await c.close()


async def test_classes_join_their_profiles(running: Running) -> None:
    """Every call joins total, its class's no-value profile and type=class."""
    c = await running.client()
    for cid, to in [("i", "00861012345678"), ("d", "0301234"), ("l", "6002")]:
        await c.call("check", **chk(cid, to=to, user=cid))
    assert (await size(c, "total"), await size(c, "international"), await size(c, "domestic"),
            await size(c, "local")) == (3, 1, 1, 1)
    assert (await size(c, "type", "international"), await size(c, "type")) == (1, 3)
    await c.close()


async def test_shadow_rule_reports_but_allows(running: Running) -> None:
    """The 3rd concurrent international call is over the shadow cap: allowed, reported, logged."""
    c = await running.client()
    for i in range(2):
        r = await c.call("check", **chk(f"i{i}", to="0044123", user=f"u{i}", account=f"x{i}"))
        assert r["decision"] == "allow" and r["shadow"] == []
    with capture_logs() as logs:
        r = await c.call("check", **chk("i2", to="0044123", user="u2", account="x2"))
    assert r["decision"] == "allow"
    assert r["shadow"] == [{"rule": "international-shadow", "profile": "international", "value": None,
                            "size": 2, "limit": 2}]
    assert any(e["event"] == "shadow_would_deny" for e in logs)
    stats = await c.call("stats")
    assert stats["rules"]["international-shadow"] == {"allow": 2, "would_deny": 1}
    await c.close()


# -- call life, idempotency, expiry --------------------------------------------------------


async def test_repeated_check_is_idempotent(running: Running) -> None:
    """A retransmitted check answers allow again and does not count twice."""
    c = await running.client()
    for i in range(3):
        await c.call("check", **chk(f"a{i}", user=f"u{i}"))
    r = await c.call("check", **chk("a0", user="u0"))
    assert r["decision"] == "allow" and r["duplicate"] is True
    assert await size(c, "account", "acme") == 3
    await c.close()


async def test_late_answer_and_refresh_of_an_earlier_attempt_are_stale(running: Running) -> None:
    """A repeated check (same Call-ID and From-tag) takes the admission over with a new token;
    `answer`/`refresh` carrying the first token answer `found: false, stale: true` and change
    nothing: the held call stays early, with its lease and the new token, and expires on time."""
    c = await running.client()
    first = await c.call("check", **chk("a", from_tag="ft"))
    assert first["decision"] == "allow" and first["token"]
    running.clock.advance(10)
    second = await c.call("check", **chk("a", from_tag="ft"))
    assert second["decision"] == "allow" and second["duplicate"] is True
    assert second["token"] and second["token"] != first["token"]

    async def held() -> dict[str, Any]:
        page = await c.call("profile_list", profile="account", value="acme")
        [rec] = page["calls"]
        assert rec["call_id"] == "a" and rec["from_tag"] == "ft"
        out: dict[str, Any] = rec
        return out

    before = await held()
    assert before["state"] == "early" and before["token"] == second["token"]
    running.clock.advance(10)
    r = await c.call("answer", call_id="a", from_tag="ft", token=first["token"])
    assert r == {"ok": True, "found": False, "stale": True}
    r = await c.call("refresh", call_id="a", from_tag="ft", token=first["token"], timeout=3600)
    assert r == {"ok": True, "found": False, "stale": True}
    assert await held() == before
    # the early lease taken over by the second check (early_timeout, 300 s) still ends on time
    running.clock.advance(before["expires"] - running.clock.now() - 1)
    assert await size(c, "account", "acme") == 1
    running.clock.advance(1)
    assert await size(c, "account", "acme") == 0
    await c.close()


async def test_late_refresh_of_an_earlier_attempt_does_not_extend_an_answered_call(running: Running) -> None:
    """Once the holder answered, a `refresh` with the earlier token is stale and keeps nothing
    alive: the answered call's lease is the one its answer gave."""
    c = await running.client()
    first = await c.call("check", **chk("a", from_tag="ft"))
    second = await c.call("check", **chk("a", from_tag="ft"))
    r = await c.call("answer", call_id="a", from_tag="ft", token=second["token"], timeout=600)
    assert r["found"] is True and r["state"] == "active"
    expires = r["expires"]
    running.clock.advance(500)
    r = await c.call("refresh", call_id="a", from_tag="ft", token=first["token"], timeout=3600)
    assert r == {"ok": True, "found": False, "stale": True}
    page = await c.call("profile_list", profile="account", value="acme")
    [rec] = page["calls"]
    assert (rec["state"], rec["expires"], rec["token"]) == ("active", expires, second["token"])
    running.clock.advance(expires - running.clock.now())
    assert await size(c, "account", "acme") == 0
    await c.close()


async def test_end_releases_once(running: Running) -> None:
    """end releases every slot; again, or for an unknown call, it is a no-op that says so."""
    c = await running.client()
    await c.call("check", **chk("a"))
    await c.call("answer", call_id="a")
    r = await c.call("end", call_id="a", reason="bye")
    assert r["ok"] and r["released"] is True
    assert (await c.call("end", call_id="a"))["released"] is False
    assert (await c.call("end", call_id="never-seen"))["released"] is False
    assert await size(c, "total") == 0 and await size(c, "account", "acme") == 0
    await c.close()


async def test_release_matches_reservation_after_rules_change(running: Running) -> None:
    """A call releases exactly the keys it reserved, even after the rules changed meanwhile."""
    c = await running.client()
    await c.call("check", **chk("a", user="alice"))
    text = (running.rules / "default.toml").read_text()
    (running.rules / "default.toml").write_text(text.replace('"{from_user}@{from_domain}"', '"{from_user}"'))
    assert (await c.call("reload"))["ok"]
    assert await size(c, "user", "alice@example.com") == 1
    await c.call("end", call_id="a")
    assert await size(c, "user", "alice@example.com") == 0 and await size(c, "total") == 0
    await c.close()


async def test_unanswered_call_expires_after_early_timeout(running: Running) -> None:
    """A checked call never answered is released after early_timeout (300 s)."""
    c = await running.client()
    for i in range(3):
        await c.call("check", **chk(f"a{i}", user=f"u{i}"))
    assert (await c.call("check", **chk("late", user="u9")))["decision"] == "deny"
    running.clock.advance(299)
    assert await size(c, "account", "acme") == 3
    running.clock.advance(1)
    assert await size(c, "account", "acme") == 0
    assert (await c.call("check", **chk("late", user="u9")))["decision"] == "allow"
    stats = await c.call("stats")
    assert stats["dialogs"]["expired_dialogs"] == 3
    await c.close()


async def test_answered_call_expires_after_default_timeout_unless_refreshed(running: Running) -> None:
    """An answered call with a lost BYE is released after default_timeout; refresh extends it."""
    c = await running.client()
    await c.call("check", **chk("a"))
    await c.call("check", **chk("b", user="other"))
    r = await c.call("answer", call_id="a")
    assert r["found"] and r["state"] == "active"
    await c.call("answer", call_id="b")
    running.clock.advance(43000)
    assert (await c.call("refresh", call_id="b", timeout=600))["found"] is True
    running.clock.advance(200)
    assert await size(c, "account", "acme") == 1  # a expired, b refreshed
    assert (await c.call("end", call_id="a"))["released"] is False
    running.clock.advance(500)
    assert await size(c, "account", "acme") == 0
    await c.close()


async def test_answer_and_refresh_unknown_call(running: Running) -> None:
    """answer/refresh of an unknown call say found: false."""
    c = await running.client()
    assert (await c.call("answer", call_id="x")) == {"ok": True, "found": False}
    assert (await c.call("refresh", call_id="x")) == {"ok": True, "found": False}
    await c.close()


async def test_answer_create_counts_an_unchecked_call(running: Running) -> None:
    """answer with create=true counts a call never checked (accounting-only), without enforcing caps."""
    c = await running.client()
    for i in range(3):
        await c.call("check", **chk(f"a{i}", user=f"u{i}"))
    r = await c.call("answer", **chk("acct-only", user="u8"), create=True)
    assert r["found"] and r["created"] and r["state"] == "active"
    assert await size(c, "account", "acme") == 4
    await c.close()


async def test_stats_names(running: Running) -> None:
    """stats uses Kamailio's dialog names and counts decisions per rule and outcome."""
    c = await running.client()
    for i in range(4):
        await c.call("check", **chk(f"a{i}", user=f"u{i}"))
    await c.call("answer", call_id="a0")
    await c.call("end", call_id="a1", reason="failed")
    s = await c.call("stats")
    assert s["dialogs"] == {"active_dialogs": 1, "early_dialogs": 1, "processed_dialogs": 3,
                            "expired_dialogs": 0, "failed_dialogs": 1}
    assert s["decisions"] == {"allow": 3, "deny": 1}
    assert s["rules"]["account-cap"] == {"allow": 3, "deny": 1}
    assert s["rules_version"] == running.service.ruleset.version
    await c.close()


async def test_profile_list(running: Running) -> None:
    """profile_list shows each call with its details, like dlg.profile_list."""
    c = await running.client()
    await c.call("check", **chk("a", user="alice"))
    await c.call("answer", call_id="a")
    r = await c.call("profile_list", profile="account", value="acme")
    [call] = r["calls"]
    assert call["call_id"] == "a" and call["state"] == "active" and call["account"] == "acme"
    assert call["from"] == "sip:alice@example.com" and call["start_ts"] == running.clock.now()
    assert {"profile": "account", "value": "acme"} in call["profiles"]
    bad = await c.call("profile_size", profile="nosuch")
    assert bad["ok"] is False and bad["error"]["code"] == "unknown_profile"
    await c.close()


async def test_dry_run_reserves_nothing_and_explains(running: Running) -> None:
    """A dry run gives the decision it would take and why, and changes no counter."""
    c = await running.client()
    for i in range(3):
        await c.call("check", **chk(f"a{i}", user=f"u{i}"))
    r = await c.call("check", **chk("x", to="0049301234", user="u5"), dry_run=True)
    assert r["dry_run"] is True and r["decision"] == "deny" and r["rule"] == "account-cap"
    assert r["attrs"] == {"type": "international"}
    why = {e["rule"]: e["why"] for e in r["explain"]}
    assert why["emergency"] == "not matched: type == 'emergency'"
    assert why["account-cap"] == "matched: account is present"
    assert await size(c, "total") == 3
    assert (await c.call("stats"))["decisions"] == {"allow": 3}
    await c.close()


# -- concurrency ---------------------------------------------------------------------------


async def test_hundreds_of_concurrent_checks_admit_exactly_the_limit(running: Running) -> None:
    """300 checks for acme over 30 pipelining connections: exactly 3 allowed."""
    clients = [await running.client() for _ in range(30)]

    async def burst(k: int, c: AClient) -> list[str]:
        await c.send(b"".join(orjson.dumps({"op": "check", **chk(f"c{k}-{i}", user=f"u{k}-{i}")}) + b"\n"
                              for i in range(10)))
        return [(await c.recv())["decision"] for _ in range(10)]

    results = await asyncio.gather(*(burst(k, c) for k, c in enumerate(clients)))
    decisions = [d for batch in results for d in batch]
    assert decisions.count("allow") == 3 and decisions.count("deny") == 297
    assert await size(clients[0], "account", "acme") == 3
    for c in clients:
        await c.close()


async def test_pipelined_replies_come_in_order_with_echo(running: Running) -> None:
    """Many requests before reading: replies in order, each echoing id, tindex and tlabel."""
    c = await running.client()
    reqs = [{"op": "check", "id": i, "tindex": 1000 + i, "tlabel": 7, **chk(f"p{i}", user=f"u{i}",
                                                                          account=f"a{i}")}
            for i in range(50)]
    await c.send(b"".join(orjson.dumps(r) + b"\n" for r in reqs) + b'{"op":"ping","id":"last"}\n')
    replies = [await c.recv() for _ in range(51)]
    assert [r["id"] for r in replies] == [*range(50), "last"]
    assert all(r["tindex"] == 1000 + i and r["tlabel"] == 7 for i, r in enumerate(replies[:50]))
    await c.close()


# -- transports and framing ------------------------------------------------------------------


async def test_netstring_request_gets_netstring_reply(running: Running) -> None:
    """A netstring request is answered as a netstring (evapi framing)."""
    c = await running.client()
    body = orjson.dumps({"op": "ping", "id": 1})
    await c.send(b"%d:%s," % (len(body), body))
    head = await asyncio.wait_for(c.reader.readuntil(b":"), 5)
    payload = await c.reader.readexactly(int(head[:-1]) + 1)
    assert payload.endswith(b",") and orjson.loads(payload[:-1])["pong"] is True
    await c.close()


async def test_udp_datagram(running: Running) -> None:
    """UDP: one JSON object per datagram, answered by one datagram."""
    loop = asyncio.get_running_loop()
    got: asyncio.Future[bytes] = loop.create_future()

    class Proto(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr: Any) -> None:
            if not got.done():
                got.set_result(data)

    transport, _ = await loop.create_datagram_endpoint(Proto, remote_addr=("127.0.0.1", running.port))
    transport.sendto(orjson.dumps({"op": "check", "id": 9, **chk("udp1")}))
    reply = orjson.loads(await asyncio.wait_for(got, 5))
    transport.close()
    assert reply["id"] == 9 and reply["decision"] == "allow"


async def test_unix_socket(running: Running) -> None:
    """The Unix socket speaks the same protocol."""
    c = await AClient.unix(running.unix)
    assert (await c.call("check", **chk("ux")))["decision"] == "allow"
    await c.close()


# -- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize(("raw", "code"), [
    (b"garbage\n", "invalid_json"),
    (b'{"op":\n', "invalid_json"),
    (b"[1,2,3]\n", "invalid_json"),
    (b'{"op":"check","call_id":"\xff\xfe"}\n', "invalid_json"),
    (b'{"op":"frobnicate"}\n', "unknown_op"),
    (b'{"call_id":"x"}\n', "missing_field"),
    (b'{"op":"check"}\n', "missing_field"),
    (b'{"op":"check","call_id":""}\n', "bad_field"),
    (b'{"op":"check","call_id":42}\n', "bad_field"),
    (b'{"op":"check","call_id":"x","from":["a"]}\n', "bad_field"),
    (b'{"op":"check","call_id":"x","attrs":{"a":1}}\n', "bad_field"),
    (b'{"op":"check","call_id":"x","dry_run":"yes"}\n', "bad_field"),
    (b'{"op":"end","call_id":"x","reason":"bored"}\n', "bad_field"),
    (b'{"op":"refresh","call_id":"x","timeout":-5}\n', "bad_field"),
    (b'{"op":"profile_size"}\n', "missing_field"),
])
async def test_bad_requests_get_an_error_and_the_connection_stays(running: Running, raw: bytes,
                                                                   code: str) -> None:
    """Each bad request gets ok:false with a code, logs one warning, changes no counter."""
    c = await running.client()
    with capture_logs() as logs:
        await c.send(raw)
        r = await c.recv()
    assert r["ok"] is False and r["error"]["code"] == code and r["error"]["message"]
    assert [e["log_level"] for e in logs] == ["warning"]
    assert (await c.call("check", **chk("after")))["decision"] == "allow"
    stats = await c.call("stats")
    assert stats["dialogs"]["processed_dialogs"] == 1
    await c.close()


async def test_bad_netstring_is_answered_and_closed(running: Running) -> None:
    """A stream that cannot be resynchronised gets an error reply, then the connection closes."""
    c = await running.client()
    other = await running.client()
    await c.send(b'{"op":"ping","id":1}\n12x:{}')
    first = await c.recv()
    assert first["id"] == 1
    rest = await asyncio.wait_for(c.reader.read(), 5)
    assert b"bad_netstring" in rest
    assert (await other.call("ping"))["ok"] is True
    await other.close()


async def test_truncated_netstring_at_end_of_stream_is_answered(running: Running) -> None:
    """A client that half-closes inside a netstring gets a `truncated` error, then the close."""
    c = await running.client()
    await c.send(b'16:{"op":"ping"},')
    c.writer.write_eof()
    rest = await asyncio.wait_for(c.reader.read(), 5)
    assert orjson.loads(rest)["error"]["code"] == "truncated"


async def test_oversize_netstring_is_refused(running: Running) -> None:
    """A netstring longer than the limit is refused without reading it."""
    c = await running.client()
    await c.send(b"99999:")
    rest = await asyncio.wait_for(c.reader.read(), 5)
    assert b"too_long" in rest


async def test_half_open_connections_do_not_block_others(running: Running) -> None:
    """Many connections holding half a message do not stop other clients; they time out."""
    running.server.conn_stats.max_connections = 60
    hangers = [await running.client() for _ in range(50)]
    for h in hangers:
        await h.send(b'{"op":"check","call_id":"half')
    c = await running.client()
    assert (await c.call("check", **chk("ok")))["decision"] == "allow"
    assert running.server.conn_stats.open == 51
    for h in hangers:
        h.writer.close()
    await c.close()


async def test_connection_limit(running: Running) -> None:
    """Past max_connections a new connection is told busy and closed; others go on."""
    running.server.conn_stats.max_connections = 2
    a, b = await running.client(), await running.client()
    assert (await a.call("ping"))["ok"]
    extra = await running.client()
    r = await extra.recv()
    assert r["error"]["code"] == "busy"
    assert (await b.call("ping"))["ok"]
    await a.close()
    await b.close()


# -- reload --------------------------------------------------------------------------------


async def test_lowering_a_limit_keeps_calls_and_denies_new_ones(running: Running) -> None:
    """Reload to a lower cap: calls stay up, new ones are denied until usage drops below it."""
    c = await running.client()
    for i in range(3):
        await c.call("check", **chk(f"a{i}", user=f"u{i}"))
    (running.rules / "account-limits.toml").write_text("[overrides.account-cap]\nacme = 1\n")
    r = await c.call("reload")
    assert r["ok"] and r["rules_version"] != ""
    assert await size(c, "account", "acme") == 3
    assert (await c.call("check", **chk("n1", user="n1")))["decision"] == "deny"
    await c.call("end", call_id="a0")
    await c.call("end", call_id="a1")
    assert (await c.call("check", **chk("n2", user="n2")))["decision"] == "deny"
    await c.call("end", call_id="a2")
    assert (await c.call("check", **chk("n3", user="n3")))["decision"] == "allow"
    await c.close()


async def test_broken_reload_keeps_old_rules(running: Running) -> None:
    """A broken edit is refused with file/rule/key; the old rules stay; the error is counted."""
    c = await running.client()
    before = running.service.ruleset.version
    path = running.rules / "default.toml"
    path.write_text(path.read_text().replace("max = 10", 'max = "ten"'))
    with capture_logs() as logs:
        r = await c.call("reload")
    assert r["ok"] is False and r["error"]["code"] == "rules_invalid"
    assert r["error"]["message"] == (f"{path}: rule 'account-cap': key 'limit.max': must be an integer, "
                                     "not a string")
    assert [e["event"] for e in logs if e["log_level"] == "error"] == ["reload_failed"]
    s = await c.call("stats")
    assert s["rules_version"] == before and s["reload_errors"] == 1
    assert s["last_reload_error"] == r["error"]["message"]
    for i in range(3):
        await c.call("check", **chk(f"a{i}", user=f"u{i}"))
    assert (await c.call("check", **chk("a3", user="u3")))["decision"] == "deny"
    await c.close()


async def test_file_watch_picks_up_changes(running: Running) -> None:
    """The watcher reloads a changed file and leaves a broken one refused."""
    svc = running.service
    assert svc.check_for_changes() is False
    (running.rules / "account-limits.toml").write_text("[overrides.account-cap]\nacme = 5\n")
    assert svc.check_for_changes() is True
    assert svc.reloads == 1
    assert svc.ruleset.evaluate({"account": "acme"}).plan[-1].limit == 5
    (running.rules / "extra.toml").write_text("[[rule]]\nname = 'x'\n")
    assert svc.check_for_changes() is True
    assert svc.reloads == 1 and svc.reload_errors == 1
    assert svc.check_for_changes() is False  # no retry storm until the file changes again


# -- store errors ------------------------------------------------------------------------------


class DownStore(EmbeddedStore):
    """An embedded store whose backend is 'down' (stands in for an unreachable Redis)."""

    async def reserve(self, *args: Any, **kw: Any) -> Any:
        raise StoreError("connection refused")

    async def end(self, *args: Any, **kw: Any) -> Any:
        raise StoreError("connection refused")


async def test_store_error_policy_per_rule() -> None:
    """Store down: emergency fails open (its rule says allow), ordinary caps fail closed with 503."""
    svc = PolicyService(ROOT / "rules", DownStore(), clock=ManualClock())
    r = await svc.handle({"op": "check", **chk("e", to="112")})
    assert r["ok"] and r["decision"] == "allow" and r["store_error"] == "connection refused"
    r = await svc.handle({"op": "check", **chk("o")})
    assert (r["decision"], r["code"], r["rule"]) == ("deny", 503, "account-cap")
    assert r["reason"] == "Call policy store unavailable" and r["store_error"] == "connection refused"
    r = await svc.handle({"op": "end", "call_id": "o"})
    assert r["ok"] is True and r["queued"] is True  # kept, applied once the store answers
    assert svc.notices.info()["pending"] == 1
    assert svc.totals == {"store_allow": 1, "store_deny": 1}


async def test_decision_log_event(running: Running) -> None:
    """Each check logs one `decision` event with call_id, decision, rule and latency."""
    c = await running.client()
    with capture_logs() as logs:
        for i in range(4):
            await c.call("check", **chk(f"a{i}", user=f"u{i}"))
    decisions = [e for e in logs if e["event"] == "decision"]
    assert [(e["call_id"], e["decision"], e.get("rule")) for e in decisions] == [
        ("a0", "allow", None), ("a1", "allow", None), ("a2", "allow", None), ("a3", "deny", "account-cap")]
    assert all(e["latency_ms"] >= 0 for e in decisions)
    await c.close()


async def test_bad_datagram_gets_an_error_datagram(running: Running) -> None:
    """A garbage UDP datagram is answered with an error datagram; the next one works (both padded to
    leave room for the answer)."""
    loop = asyncio.get_running_loop()
    got: asyncio.Queue[bytes] = asyncio.Queue()

    class Proto(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr: Any) -> None:
            got.put_nowait(data)

    transport, _ = await loop.create_datagram_endpoint(Proto, remote_addr=("127.0.0.1", running.port))
    # padded: an answer over UDP is never larger than its request (tests/test_transports.py)
    transport.sendto(b"\xff not json" + b" " * 200)
    transport.sendto(orjson.dumps({"op": "ping", "id": 2, "pad": "x" * 100}))
    first = orjson.loads(await asyncio.wait_for(got.get(), 5))
    second = orjson.loads(await asyncio.wait_for(got.get(), 5))
    transport.close()
    assert first["ok"] is False and first["error"]["code"] == "invalid_json"
    assert second == {"id": 2, "ok": True, "pong": True, "rules_version": running.service.ruleset.version}


async def test_incomplete_message_times_out(tmp_path: Path) -> None:
    """A connection holding half a message past partial_timeout is answered 'timeout' and closed."""
    port = free_port()
    settings = Settings(tcp=f"127.0.0.1:{port}", udp=None, unix=None, rules=str(ROOT / "rules"), snapshot=None,
                        watch=False, metrics=None, partial_timeout=0.2, base_dir=tmp_path)
    server = Server(settings, clock=ManualClock())
    await server.start()
    try:
        c = await AClient.tcp(port)
        await c.send(b'{"op":"check","call_id":"slow')
        rest = await asyncio.wait_for(c.reader.read(), 5)
        assert orjson.loads(rest)["error"]["code"] == "timeout"
        assert server.conn_stats.open == 0
    finally:
        await server.stop()


# -- rules the store cannot carry out ------------------------------------------------------------


class NoRatesStore(EmbeddedStore):
    """A store without call-rate buckets (every store here has them: this one stands for a future one)."""

    supports_rates = False


RATE_RULES = """
[profiles]
no_value = ["total"]

[[rule]]
name = "cps"
join = [{ profile = "total" }]
rate = { max = 10 }
"""


async def test_rules_with_rates_are_refused_on_a_store_without_them(tmp_path: Path) -> None:
    """At start, and at a reload (the old rules stay), a rule with a rate on a store that cannot
    count rates is a load error naming the rule, never a check that silently ignores it."""
    from policy.errors import RuleError

    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "r.toml").write_text(RATE_RULES)
    with pytest.raises(RuleError, match=r"rule 'cps'.*call rates are not supported"):
        PolicyService(rules, NoRatesStore(), clock=ManualClock())
    (rules / "r.toml").write_text(RATE_RULES.replace('rate = { max = 10 }\n', ''))
    svc = PolicyService(rules, NoRatesStore(), clock=ManualClock())
    (rules / "r.toml").write_text(RATE_RULES)
    r = await svc.handle({"op": "reload"})
    assert r["ok"] is False and r["error"]["code"] == "rules_invalid" and "call rates" in r["error"]["message"]
    assert not svc.ruleset.uses_rates
