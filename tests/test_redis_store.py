"""The Redis store on a real redis-server: Lua contracts, key layout, edge cases, batching,
settings and Sentinel.

The shared contract (tests/test_store_contract.py) runs against this store too. Faults (Redis
down, hung, restarted empty, FLUSHALL, clocks, TLS, undo) are in test_redis_faults.py; scale
(100k held calls, SLOWLOG) in test_redis_scale.py.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aredis

from policy.clock import SystemClock
from policy.errors import StoreError
from policy.settings import Settings
from policy.store.base import CallInfo, PlanEntry
from policy.store.factory import make_store
from policy.store.redis import RedisStore, parse_sentinel_url, parse_target, script_source
from policy.store.redis.store import SCRIPTS
from tests.helpers import free_port

pytestmark = pytest.mark.redis

T0 = 1_800_000_000.0
TOK = "tok"
LUA = Path(__file__).parent.parent / "policy/store/redis/lua"


def acct(value: str, limit: int | None = None) -> PlanEntry:
    return PlanEntry("account", value, limit, False, "account-cap")


TOTAL = PlanEntry("total", None, None, False, "count-all")


def call(cid: str, account: str = "acme", node: str = "") -> CallInfo:
    return CallInfo(cid, f"sip:{cid}@example.com", "sip:100@example.com", account, "", node)


@pytest.fixture
def prefix() -> str:
    return f"t{uuid.uuid4().hex[:8]}"


@pytest.fixture
async def store(redis_url: str, prefix: str) -> AsyncIterator[RedisStore]:
    s = RedisStore(redis_url, prefix=prefix, timeout=0.5)
    await s.start()
    yield s
    await s.close()


@pytest.fixture
async def raw(redis_url: str) -> AsyncIterator[aredis.Redis]:
    r = aredis.Redis.from_url(redis_url, decode_responses=True)
    yield r
    await r.aclose()


# -- the Lua contracts --------------------------------------------------------------------


def test_every_script_has_a_header_stating_keys_argv_and_return() -> None:
    for name in SCRIPTS:
        text = (LUA / f"{name}.lua").read_text()
        head = "\n".join(line for line in text.splitlines() if line.startswith("--"))
        assert text.startswith("-- "), name
        assert "KEYS[1]" in head and "ARGV[1]" in head and "Returns" in head, name
        assert "redis.call" in script_source(name)


#: Scripts that touch keys not in KEYS (each says so in its header) and why.
UNDECLARED = {
    "end": "the call's profile keys come from its record",
    "undo": "as end",
    "sweep": "the expired calls are found by the script",
    "walk": "the values of a profile are found by the script",
}


def test_scripts_touch_only_declared_keys_except_the_documented_ones() -> None:
    """Every redis.call on a key uses KEYS[...]; the exceptions are documented in the header and
    never on the check path (reserve.lua neither names a key itself nor calls `release`)."""
    lib = (LUA / "_lib.lua").read_text()
    for name in SCRIPTS:
        body = (LUA / f"{name}.lua").read_text()
        code = "\n".join(line for line in body.splitlines() if not line.lstrip().startswith("--"))
        firsts = re.findall(r"redis\.call\('(\w+)',\s*([^,)]+)", code)
        undeclared = [(cmd, arg) for cmd, arg in firsts
                      if cmd not in ("TIME",) and not arg.strip().startswith("KEYS[")]
        uses_release = "release(" in code
        if name in UNDECLARED:
            head = "\n".join(line for line in body.splitlines() if line.startswith("--"))
            assert "Also" in head and "by name" in head, name  # "Also touches/reads, by name, ..."
        else:
            assert not undeclared and not uses_release, (name, undeclared)
    assert "local function release" in lib
    reserve = (LUA / "reserve.lua").read_text()
    assert "release(" not in reserve and "P .. " not in reserve


# -- layout and edge cases ---------------------------------------------------------------


async def test_limit_zero_refuses_and_joins_nothing(store: RedisStore, raw: aredis.Redis,
                                                    prefix: str) -> None:
    r = await store.reserve(call("a"), [TOTAL, acct("acme", 0)], T0, 300, TOK)
    assert (r.admitted, r.blocked, r.sizes, r.record) == (False, 1, [0, 0], None)
    assert sorted(await raw.keys(f"{{{prefix}}}:*")) == [f"{{{prefix}}}:n"]  # only the counters
    assert (await store.stats(T0)).processed_dialogs == 0


async def test_six_profiles_then_end_leaves_no_keys(store: RedisStore, raw: aredis.Redis,
                                                    prefix: str) -> None:
    plan = [TOTAL, acct("acme", 5), PlanEntry("user", "u@x", 4, False, "user-cap"),
            PlanEntry("type", "local", None, False, "count-all"), PlanEntry("local", None),
            PlanEntry("emergency", None, 9, True, "s"), acct("acme", 10)]
    r = await store.reserve(call("a", node="kam1"), plan, T0, 300, TOK)
    assert r.admitted and r.sizes == [1] * 7
    tag = f"{{{prefix}}}"
    keys = set(await raw.keys(f"{tag}:*"))
    assert keys == {
        f"{tag}:c:a", f"{tag}:exp", f"{tag}:n", f"{tag}:o:kam1",
        f"{tag}:k:total", f"{tag}:k:account=acme", f"{tag}:k:user=u@x", f"{tag}:k:type=local",
        f"{tag}:k:local", f"{tag}:k:emergency",
        f"{tag}:v:account", f"{tag}:v:user", f"{tag}:v:type",
    }
    counts = await raw.hgetall(f"{tag}:n")
    assert (counts["p:account"], counts["p:user"], counts["k:account=acme"], counts["seq"]) == ("1", "1", "1", "1")
    assert "p:total" not in counts and "k:total" not in counts  # a key without value: its zset's ZCARD
    assert await raw.zscore(f"{tag}:exp", "a") == T0 + 300  # the lease, in Redis time (offset 0 here)
    assert await raw.zrange(f"{tag}:v:account", 0, -1) == ["acme"]
    rec = await store.answer("a", T0 + 1, 1000)
    assert rec is not None and rec.state == "active"
    assert await raw.zscore(f"{tag}:exp", "a") == T0 + 1001
    assert await store.end("a", T0 + 2, "bye") is not None
    assert set(await raw.keys(f"{tag}:*")) == {f"{tag}:n"}
    left = await raw.hgetall(f"{tag}:n")
    assert not [f for f in left if ":" in f], left  # no key's or profile's counter stays behind
    assert (left["processed"], left["active"]) == ("1", "0")


async def test_same_call_checked_twice_from_two_instances(redis_url: str, prefix: str) -> None:
    a = RedisStore(redis_url, prefix=prefix, timeout=0.5)
    b = RedisStore(redis_url, prefix=prefix, timeout=0.5)
    await a.start()
    await b.start()
    try:
        plan = [TOTAL, acct("acme", 1)]
        r1, r2 = await asyncio.gather(a.reserve(call("x"), plan, T0, 300, "ta"),
                                      b.reserve(call("x"), plan, T0, 300, "tb"))
        assert r1.admitted and r2.admitted
        assert sorted([r1.duplicate, r2.duplicate]) == [False, True]
        dup = r1 if r1.duplicate else r2
        assert dup.record is not None and dup.record.call_id == "x" and dup.sizes == [1, 1]
        assert dup.record.token == ("ta" if dup is r1 else "tb")  # the later check holds the call
        assert (await a.stats(T0)).processed_dialogs == 1
        # the other instance ends it; the first sees it gone
        assert await b.end("x", T0 + 1, "bye") is not None
        assert await a.get_call("x", T0 + 1) is None
        assert await a.profile_size("account", "acme", T0 + 1) == 0
    finally:
        await a.close()
        await b.close()


async def test_end_before_answer_answer_after_end(store: RedisStore) -> None:
    await store.reserve(call("a"), [acct("acme", 3)], T0, 300, TOK)
    rec = await store.end("a", T0 + 1, "cancel")
    assert rec is not None and rec.state == "early"
    assert await store.answer("a", T0 + 2, 100) is None
    assert await store.end("a", T0 + 3, "bye") is None
    s = await store.stats(T0 + 3)
    assert (s.early_dialogs, s.active_dialogs, s.failed_dialogs) == (0, 0, 1)
    # answer twice: the second only renews the lease, start_ts stays
    await store.reserve(call("b"), [acct("acme", 3)], T0, 300, TOK)
    first = await store.answer("b", T0 + 5, 100)
    again = await store.answer("b", T0 + 7, 100)
    assert first is not None and again is not None
    assert again.start_ts == T0 + 5 and again.expires == T0 + 107
    s = await store.stats(T0 + 8)
    assert (s.early_dialogs, s.active_dialogs) == (0, 1)


async def test_end_reason_timeout_counts_expired(store: RedisStore) -> None:
    await store.reserve(call("a"), [TOTAL], T0, 300, TOK)
    await store.end("a", T0, "timeout")
    assert (await store.stats(T0)).expired_dialogs == 1


async def test_odd_profile_and_value_names(store: RedisStore) -> None:
    """Values with ':' '=' '{' and non-ASCII, and a profile with '=' stay distinct keys."""
    plan = [PlanEntry("a=b", "c"), PlanEntry("a", "b=c"), PlanEntry("p", "x:{y}=ü"), PlanEntry("p", "")]
    r = await store.reserve(call("a"), plan, T0, 300, TOK)
    assert r.sizes == [1, 1, 1, 1]
    assert await store.profile_size("a", "b=c", T0) == 1
    assert await store.profile_size("a=b", "c", T0) == 1
    assert await store.profile_size("a", None, T0) == 1
    assert await store.profile_size("p", "", T0) == 1
    assert await store.profile_size("p", None, T0) == 1
    assert dict((await store.profile_values("p", T0)).items) == {"x:{y}=ü": 1, "": 1}
    rec = await store.get_call("a", T0)
    assert rec is not None and rec.profiles == [("a=b", "c"), ("a", "b=c"), ("p", "x:{y}=ü"), ("p", "")]
    assert [c.call_id for c in (await store.profile_list("p", None, T0)).items] == ["a"]
    assert await store.end("a", T0, "bye") is not None
    assert await store.profile_size("p", None, T0) == 0
    assert (await store.profile_values("p", T0)).items == []


async def test_float_times_round_trip_exactly(store: RedisStore) -> None:
    now = 1_764_115_200.123456
    r = await store.reserve(call("a"), [TOTAL], now, 0.1, TOK)
    assert r.record is not None and r.record.expires == now + 0.1
    rec = await store.get_call("a", now)
    assert rec is not None and rec.init_ts == now and rec.expires == now + 0.1
    assert await store.get_call("a", now + 0.1) is None


async def test_lazy_expiry_beyond_one_sweep_batch_keeps_counts_exact(store: RedisStore) -> None:
    """More ended leases than one sweep script drops: sizes, stats and checks still count only
    live calls (the store sweeps batches until none waits), and each expiry is reported once."""
    await asyncio.gather(*(store.reserve(call(f"c{i}"), [TOTAL, acct("acme", 3)], T0, 10, TOK)
                           for i in range(3)))
    await asyncio.gather(*(store.reserve(call(f"d{i}"), [TOTAL], T0, 10, TOK) for i in range(447)))
    await store.reserve(call("live"), [TOTAL], T0, 1000, TOK)
    assert await store.profile_size("total", None, T0 + 10) == 1
    s = await store.stats(T0 + 10)
    assert (s.early_dialogs, s.expired_dialogs) == (1, 450)
    assert (await store.reserve(call("new"), [acct("acme", 3)], T0 + 10, 300, TOK)).admitted
    reported = await store.sweep(T0 + 11)
    assert len(reported) == 450 and len({r.call_id for r in reported}) == 450


async def test_listings_page_through_values_and_dedupe(store: RedisStore) -> None:
    """A whole-profile listing walks the key without value and every value, each call once
    (also a call in two values), in pages that resume where they stopped."""
    for i in range(30):
        await store.reserve(call(f"v{i:02d}", node="n1"), [acct(f"a{i % 4}")], T0, 300, TOK)
    await store.reserve(call("both"), [acct("a0"), acct("a1")], T0, 300, TOK)
    await store.reserve(call("none"), [PlanEntry("account", None)], T0, 300, TOK)
    seen: list[str] = []
    cursor, pages = "", 0
    while True:
        page = await store.profile_list("account", None, T0, cursor, 4)
        assert len(page.items) <= 4
        seen += [r.call_id for r in page.items]
        cursor, pages = page.cursor, pages + 1
        if not cursor:
            break
        assert pages < 40
    assert sorted(seen) == sorted([f"v{i:02d}" for i in range(30)] + ["both", "none"])
    assert await store.profile_size("account", None, T0) == 32
    values = dict((await store.profile_values("account", T0, "", 2)).items)
    assert values == {"a0": 9}  | {"a1": 9}
    allv: dict[str, int] = {}
    cursor = ""
    while True:
        page = await store.profile_values("account", T0, cursor, 3)
        allv.update(page.items)
        cursor = page.cursor
        if not cursor:
            break
    assert allv == {"a0": 9, "a1": 9, "a2": 7, "a3": 7}
    node = await store.node_calls("n1", T0, "", 7)
    assert len(node.items) == 7 and node.cursor
    with pytest.raises(StoreError):
        await store.profile_list("account", None, T0, "garbage", 4)
    with pytest.raises(StoreError):
        await store.node_calls("n1", T0, "x1", 4)


# -- batching ---------------------------------------------------------------------------


async def test_concurrent_operations_share_round_trips(store: RedisStore) -> None:
    before_batches, before_ops = store.batches, store.ops
    plan = [TOTAL, acct("acme", 10)]
    res = await asyncio.gather(*(store.reserve(call(f"c{i}"), plan, T0, 300, TOK) for i in range(500)))
    assert sum(r.admitted for r in res) == 10
    assert store.ops - before_ops == 500
    assert store.batches - before_batches <= 5


async def test_script_flush_is_survived(store: RedisStore, raw: aredis.Redis) -> None:
    await store.reserve(call("a"), [TOTAL], T0, 300, TOK)
    await raw.script_flush()
    # a batch mixing several scripts, all of them NOSCRIPT now
    got = await asyncio.gather(store.reserve(call("b"), [TOTAL], T0, 300, TOK), store.get_call("a", T0),
                               store.profile_size("total", None, T0), store.stats(T0))
    assert got[0].admitted and got[1] is not None and got[2] == 2
    assert got[3].processed_dialogs == 2


async def test_closed_store_raises_store_error(redis_url: str) -> None:
    s = RedisStore(redis_url, timeout=0.5)
    await s.start()
    await s.close()
    with pytest.raises(StoreError):
        await s.stats(T0)


async def test_close_fails_calls_in_flight(redis_url: str) -> None:
    s = RedisStore(redis_url, timeout=0.5)
    await s.start()
    pending = asyncio.gather(*(s.get_call(f"x{i}", T0) for i in range(50)), return_exceptions=True)
    await asyncio.sleep(0)
    await s.close()
    results = await asyncio.wait_for(pending, 2)
    assert all(isinstance(r, StoreError) or r is None for r in results)


# -- settings, URLs and Sentinel -----------------------------------------------------------


def test_from_settings_and_factory() -> None:
    st = Settings(store="redis", redis_url="redis://127.0.0.1:6390/2", redis_prefix="pp",
                  store_timeout=0.2)
    s = RedisStore.from_settings(st)
    assert (s.url, s.prefix, s.timeout, s.connect_timeout) == ("redis://127.0.0.1:6390/2", "pp", 0.2, 1.0)
    assert s.layout.key("account", "acme") == "{pp}:k:account=acme"
    assert s.target.db == 2
    st2 = Settings(store="redis://127.0.0.1:6391/0", store_connect_timeout=2.5)
    assert RedisStore.from_settings(st2).url == "redis://127.0.0.1:6391/0"
    assert RedisStore.from_settings(st2).connect_timeout == 2.5
    st3 = Settings(store="redis", redis_sentinels=["127.0.0.1:26379"], redis_service="svc")
    clock = SystemClock()
    s3 = make_store(st3, clock)
    assert isinstance(s3, RedisStore) and s3.name == "redis" and s3.clock is clock
    assert s3.target.sentinels == (("127.0.0.1", 26379),) and s3.target.service == "svc"


def test_bad_addresses_raise_store_error() -> None:
    for url in ("redis://127.0.0.1:notaport/0", "http://127.0.0.1/", "redis+sentinel:///svc",
                "redis://127.0.0.1/x", "rediss://127.0.0.1/0?ssl_cert_reqs=maybe", "unix://"):
        with pytest.raises(StoreError):
            RedisStore(url)
    with pytest.raises(StoreError):
        RedisStore("redis://127.0.0.1/0", timeout=0)
    with pytest.raises(StoreError):
        RedisStore("redis://127.0.0.1/0", connect_timeout=0)


def test_parse_urls() -> None:
    assert parse_sentinel_url("redis+sentinel://h1:1,h2:2/svc/3") == (
        [("h1", 1), ("h2", 2)], "svc", 3, None, None)
    assert parse_sentinel_url("redis+sentinel://:pw@h1/svc") == ([("h1", 26379)], "svc", 0, None, "pw")
    with pytest.raises(StoreError):
        parse_sentinel_url("redis+sentinel:///svc")
    t = parse_target("redis://u:p%40ss@10.0.0.1:6380/4")
    assert (t.address and (t.address.host, t.address.port, t.address.tls), t.db, t.username, t.password) == \
        (("10.0.0.1", 6380, None), 4, "u", "p@ss")
    t = parse_target("unix:///run/redis.sock?db=2&password=x")
    assert (t.address and t.address.path, t.db, t.password) == ("/run/redis.sock", 2, "x")
    t = parse_target("rediss://h/0?ssl_cert_reqs=none")
    assert t.address is not None and t.address.tls is not None and not t.address.tls.check_hostname
    assert "p@ss" not in parse_target("redis://u:p%40ss@h/0").label


def _start(cmd: list[str], port: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                if sock.recv(64).startswith(b"+PONG"):
                    return proc
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"{cmd[0]} on {port} did not start")


async def test_sentinel_follows_a_failover() -> None:
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.skip("redis-server not installed")
    d = Path(tempfile.mkdtemp(prefix="sentinel-"))
    p1, p2, ps = free_port(), free_port(), free_port()
    base = [exe, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(d)]
    procs = [_start([*base, "--port", str(p1)], p1),
             _start([*base, "--port", str(p2), "--replicaof", "127.0.0.1", str(p1)], p2)]
    conf = d / "sentinel.conf"
    conf.write_text(f"port {ps}\nbind 127.0.0.1\ndir {d}\n"
                    f"sentinel monitor mymaster 127.0.0.1 {p1} 1\n"
                    "sentinel down-after-milliseconds mymaster 1000\n"
                    "sentinel failover-timeout mymaster 5000\n")
    procs.append(_start([exe, str(conf), "--sentinel"], ps))
    s = RedisStore(f"redis+sentinel://127.0.0.1:{ps}/mymaster/0", timeout=0.2)
    try:
        await s.start()
        assert (await s.reserve(call("a"), [TOTAL], T0, 300, TOK)).admitted
        admin = aredis.Redis(host="127.0.0.1", port=ps, decode_responses=True)
        # wait until the replica is in sync and known to the sentinel, then fail over
        deadline = time.monotonic() + 15
        while True:
            try:
                await admin.execute_command("SENTINEL", "FAILOVER", "mymaster")
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)
        deadline = time.monotonic() + 15
        while True:
            addr = await admin.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", "mymaster")
            if int(addr[1]) == p2:
                break
            assert time.monotonic() < deadline, "no failover"
            await asyncio.sleep(0.1)
        await admin.aclose()
        deadline = time.monotonic() + 10
        while True:  # the store follows the new primary (the call was replicated)
            try:
                r = await s.reserve(call("b"), [TOTAL], T0, 300, TOK)
                if r.admitted:
                    break
            except StoreError:
                pass
            assert time.monotonic() < deadline, "store did not follow the failover"
            await asyncio.sleep(0.1)
        assert await s.profile_size("total", None, T0) == 2
    finally:
        await s.close()
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        shutil.rmtree(d, ignore_errors=True)
