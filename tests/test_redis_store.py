"""The Redis store on a real redis-server: Lua edge cases, key layout, failures, Sentinel.

The shared contract (tests/test_store_contract.py) runs against this store too; these tests
cover what only the Redis backend has: several instances on one Redis, script reloads,
Redis down, hung or restarted, and the bounded time of every failing call.
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis.asyncio as aredis

from policy.clock import SystemClock
from policy.errors import StoreError
from policy.settings import Settings
from policy.store.base import CallInfo, PlanEntry
from policy.store.factory import make_store
from policy.store.redis import RedisStore, load_script_source, parse_sentinel_url
from tests.helpers import RedisServer, free_port

pytestmark = pytest.mark.redis

T0 = 1_800_000_000.0
SLACK = 0.25  # scheduling slack on a loaded CI machine, on top of the store timeout


def acct(value: str, limit: int | None = None) -> PlanEntry:
    return PlanEntry("account", value, limit, False, "account-cap")


TOTAL = PlanEntry("total", None, None, False, "count-all")


def call(cid: str, account: str = "acme") -> CallInfo:
    return CallInfo(cid, f"sip:{cid}@example.com", "sip:100@example.com", account)


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


@pytest.fixture
def private_redis() -> Iterator[RedisServer]:
    """A redis-server of this test's own, to kill, stop and restart."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server not installed")
    server = RedisServer().start()
    yield server
    if server.proc is not None:
        with_cont(server)
    server.stop()


def with_cont(server: RedisServer) -> None:
    """Resume a SIGSTOPped server so that it can be stopped."""
    if server.proc is not None and server.proc.poll() is None:
        server.proc.send_signal(signal.SIGCONT)


async def until_ok(store: RedisStore, within: float) -> float:
    """Retry a cheap call until it works; how long that took (fails the test past `within`)."""
    t0 = time.monotonic()
    while True:
        try:
            await store.profile_size("total", None, T0)
            return time.monotonic() - t0
        except StoreError:
            if time.monotonic() - t0 > within:
                raise
            await asyncio.sleep(0.02)


# -- Lua edge cases ---------------------------------------------------------------------


async def test_every_script_has_a_header_stating_keys_argv_and_return() -> None:
    for name in ("reserve", "answer", "refresh", "end", "get", "size", "list", "stats", "sweep"):
        text = (Path(__file__).parent.parent / "policy/store/lua" / f"{name}.lua").read_text()
        head = "\n".join(line for line in text.splitlines() if line.startswith("--"))
        assert text.startswith("-- "), name
        assert "KEYS[1]" in head and "ARGV[1]" in head and "Returns" in head, name
        assert "redis.call" in load_script_source(name)


async def test_limit_zero_refuses_and_joins_nothing(store: RedisStore, raw: aredis.Redis,
                                                    prefix: str) -> None:
    r = await store.reserve(call("a"), [TOTAL, acct("acme", 0)], T0, 300)
    assert (r.admitted, r.blocked, r.sizes, r.record) == (False, 1, [0, 0], None)
    assert sorted(await raw.keys(f"{{{prefix}}}:*")) == []
    assert (await store.stats(T0)).processed_dialogs == 0


async def test_six_profiles_then_end_leaves_no_keys(store: RedisStore, raw: aredis.Redis,
                                                    prefix: str) -> None:
    plan = [TOTAL, acct("acme", 5), PlanEntry("user", "u@x", 4, False, "user-cap"),
            PlanEntry("type", "local", None, False, "count-all"), PlanEntry("local", None),
            PlanEntry("emergency", None, 9, True, "s"), acct("acme", 10)]
    r = await store.reserve(call("a"), plan, T0, 300)
    assert r.admitted and r.sizes == [1] * 7
    tag = f"{{{prefix}}}"
    keys = set(await raw.keys(f"{tag}:*"))
    assert keys == {
        f"{tag}:c:a", f"{tag}:exp", f"{tag}:stats",
        f"{tag}:k:total", f"{tag}:k:account=acme", f"{tag}:k:user=u@x", f"{tag}:k:type=local",
        f"{tag}:k:local", f"{tag}:k:emergency",
        f"{tag}:i:account", f"{tag}:i:user", f"{tag}:i:type",
    }
    # every zset scores the call by its lease expiry
    assert await raw.zscore(f"{tag}:k:account=acme", "a") == T0 + 300
    rec = await store.answer("a", T0 + 1, 1000)
    assert rec is not None
    assert await raw.zscore(f"{tag}:k:user=u@x", "a") == T0 + 1001
    assert await raw.smembers(f"{tag}:i:account") == {f"{tag}:k:account=acme"}
    assert await store.end("a", T0 + 2, "bye") is not None
    assert set(await raw.keys(f"{tag}:*")) == {f"{tag}:stats"}


async def test_same_call_checked_twice_from_two_instances(redis_url: str, prefix: str) -> None:
    a = RedisStore(redis_url, prefix=prefix, timeout=0.5)
    b = RedisStore(redis_url, prefix=prefix, timeout=0.5)
    await a.start()
    await b.start()
    try:
        plan = [TOTAL, acct("acme", 1)]
        r1, r2 = await asyncio.gather(a.reserve(call("x"), plan, T0, 300),
                                      b.reserve(call("x"), plan, T0, 300))
        assert r1.admitted and r2.admitted
        assert sorted([r1.duplicate, r2.duplicate]) == [False, True]
        dup = r1 if r1.duplicate else r2
        assert dup.record is not None and dup.record.call_id == "x" and dup.sizes == [1, 1]
        assert (await a.stats(T0)).processed_dialogs == 1
        # the other instance ends it; the first sees it gone
        assert await b.end("x", T0 + 1, "bye") is not None
        assert await a.get_call("x", T0 + 1) is None
        assert await a.profile_size("account", "acme", T0 + 1) == 0
    finally:
        await a.close()
        await b.close()


async def test_end_before_answer_answer_after_end(store: RedisStore) -> None:
    await store.reserve(call("a"), [acct("acme", 3)], T0, 300)
    rec = await store.end("a", T0 + 1, "cancel")
    assert rec is not None and rec.state == "early"
    assert await store.answer("a", T0 + 2, 100) is None
    assert await store.end("a", T0 + 3, "bye") is None
    s = await store.stats(T0 + 3)
    assert (s.early_dialogs, s.active_dialogs, s.failed_dialogs) == (0, 0, 1)
    # answer twice: the second only renews the lease, start_ts stays
    await store.reserve(call("b"), [acct("acme", 3)], T0, 300)
    first = await store.answer("b", T0 + 5, 100)
    again = await store.answer("b", T0 + 7, 100)
    assert first is not None and again is not None
    assert again.start_ts == T0 + 5 and again.expires == T0 + 107
    s = await store.stats(T0 + 8)
    assert (s.early_dialogs, s.active_dialogs) == (0, 1)


async def test_end_reason_timeout_counts_expired(store: RedisStore) -> None:
    await store.reserve(call("a"), [TOTAL], T0, 300)
    await store.end("a", T0, "timeout")
    assert (await store.stats(T0)).expired_dialogs == 1


async def test_odd_profile_and_value_names(store: RedisStore) -> None:
    """Values with ':' '=' '{' and non-ASCII, and a profile with '=' stay distinct keys."""
    plan = [PlanEntry("a=b", "c"), PlanEntry("a", "b=c"), PlanEntry("p", "x:{y}=ü")]
    r = await store.reserve(call("a"), plan, T0, 300)
    assert r.sizes == [1, 1, 1]
    assert await store.profile_size("a", "b=c", T0) == 1
    assert await store.profile_size("a=b", "c", T0) == 1
    assert await store.profile_size("a", None, T0) == 1
    rec = await store.get_call("a", T0)
    assert rec is not None and rec.profiles == [("a=b", "c"), ("a", "b=c"), ("p", "x:{y}=ü")]


async def test_float_times_round_trip_exactly(store: RedisStore) -> None:
    now = 1_764_115_200.123456
    r = await store.reserve(call("a"), [TOTAL], now, 0.1)
    assert r.record is not None and r.record.expires == now + 0.1
    rec = await store.get_call("a", now)
    assert rec is not None and rec.init_ts == now and rec.expires == now + 0.1
    assert await store.get_call("a", now + 0.1) is None


async def test_concurrent_sweeps_count_each_expiry_once(redis_url: str, prefix: str) -> None:
    stores = [RedisStore(redis_url, prefix=prefix, timeout=2.0) for _ in range(3)]
    for s in stores:
        await s.start()
    try:
        await asyncio.gather(*(stores[0].reserve(call(f"c{i}"), [TOTAL, acct(f"a{i % 7}")], T0, 10)
                               for i in range(2500)))
        dropped = await asyncio.gather(*(s.sweep(T0 + 10) for s in stores))
        assert sum(dropped) == 2500
        st = await stores[1].stats(T0 + 10)
        assert (st.expired_dialogs, st.early_dialogs, st.processed_dialogs) == (2500, 0, 2500)
        assert await stores[2].profile_size("account", None, T0 + 10) == 0
    finally:
        for s in stores:
            await s.close()


async def test_lazy_expiry_beyond_one_purge_batch_keeps_counts_exact(store: RedisStore) -> None:
    """More ended leases than one script drops: sizes and stats still only count live calls."""
    await asyncio.gather(*(store.reserve(call(f"c{i}"), [TOTAL], T0, 10) for i in range(450)))
    await store.reserve(call("live"), [TOTAL], T0, 1000)
    assert await store.profile_size("total", None, T0 + 10) == 1
    s = await store.stats(T0 + 10)
    assert (s.early_dialogs, s.expired_dialogs) == (1, 450)


# -- batching ---------------------------------------------------------------------------


async def test_concurrent_operations_share_round_trips(store: RedisStore) -> None:
    before_batches, before_ops = store.batches, store.ops
    plan = [TOTAL, acct("acme", 10)]
    res = await asyncio.gather(*(store.reserve(call(f"c{i}"), plan, T0, 300) for i in range(500)))
    assert sum(r.admitted for r in res) == 10
    assert store.ops - before_ops == 500
    assert store.batches - before_batches <= 5


async def test_script_flush_is_survived(store: RedisStore, raw: aredis.Redis) -> None:
    await store.reserve(call("a"), [TOTAL], T0, 300)
    await raw.script_flush()
    # a batch mixing several scripts, all of them NOSCRIPT now
    got = await asyncio.gather(store.reserve(call("b"), [TOTAL], T0, 300), store.get_call("a", T0),
                               store.profile_size("total", None, T0), store.stats(T0))
    assert got[0].admitted and got[1] is not None and got[2] == 2
    assert got[3].processed_dialogs == 2


# -- failures ---------------------------------------------------------------------------


async def test_redis_down_at_start_then_up(tmp_path: Path) -> None:
    port = free_port()
    s = RedisStore(f"redis://127.0.0.1:{port}/0", timeout=0.05)
    await s.start()  # not fatal
    try:
        t0 = time.monotonic()
        with pytest.raises(StoreError):
            await s.reserve(call("a"), [TOTAL], T0, 300)
        assert time.monotonic() - t0 < 0.05 + SLACK
        server = RedisServer(port=port).start()
        try:
            assert await until_ok(s, 1.0) < 1.0
            assert (await s.reserve(call("a"), [TOTAL], T0, 300)).admitted
        finally:
            server.stop()
    finally:
        await s.close()


async def test_every_method_raises_store_error_within_the_bound(private_redis: RedisServer) -> None:
    s = RedisStore(private_redis.url, timeout=0.05)
    await s.start()
    try:
        await s.reserve(call("a"), [TOTAL], T0, 300)
        private_redis.stop(signal.SIGKILL)
        ops = [
            lambda: s.reserve(call("b"), [TOTAL, acct("acme", 3)], T0, 300),
            lambda: s.answer("a", T0, 10), lambda: s.refresh("a", T0, 10),
            lambda: s.end("a", T0, "bye"), lambda: s.get_call("a", T0),
            lambda: s.profile_size("total", None, T0), lambda: s.profile_list("total", None, T0),
            lambda: s.stats(T0), lambda: s.sweep(T0),
        ]
        for op in ops:
            t0 = time.monotonic()
            with pytest.raises(StoreError):
                await op()
            assert time.monotonic() - t0 < 0.05 + SLACK
    finally:
        await s.close()


async def test_hung_redis_bounds_every_call_and_recovers(private_redis: RedisServer) -> None:
    s = RedisStore(private_redis.url, timeout=0.05)
    await s.start()
    try:
        assert (await s.reserve(call("a"), [TOTAL], T0, 300)).admitted
        assert private_redis.proc is not None
        private_redis.proc.send_signal(signal.SIGSTOP)  # accepts nothing, answers nothing
        t0 = time.monotonic()
        results = await asyncio.gather(*(s.reserve(call(f"h{i}"), [TOTAL], T0, 300) for i in range(50)),
                                       return_exceptions=True)
        assert all(isinstance(r, StoreError) for r in results)
        assert time.monotonic() - t0 < 0.05 + SLACK
        for _ in range(3):  # later calls do not queue behind the hung socket
            t1 = time.monotonic()
            with pytest.raises(StoreError):
                await s.get_call("a", T0)
            assert time.monotonic() - t1 < 0.05 + SLACK
        private_redis.proc.send_signal(signal.SIGCONT)
        assert await until_ok(s, 1.0) < 1.0
        assert (await s.get_call("a", T0)) is not None
    finally:
        await s.close()


async def test_redis_restart_reloads_scripts_and_recovers(private_redis: RedisServer) -> None:
    s = RedisStore(private_redis.url, timeout=0.05)
    await s.start()
    try:
        assert (await s.reserve(call("a"), [TOTAL], T0, 300)).admitted
        port = private_redis.port
        private_redis.stop(signal.SIGKILL)
        with pytest.raises(StoreError):
            await s.get_call("a", T0)
        restarted = RedisServer(port=port).start()  # empty: no scripts, no data
        try:
            assert await until_ok(s, 1.0) < 1.0
            assert (await s.reserve(call("b"), [TOTAL], T0, 300)).admitted
        finally:
            restarted.stop()
    finally:
        await s.close()


async def test_busy_event_loop_is_not_a_slow_redis(redis_url: str) -> None:
    """Replies Redis sent in time count even when our own loop is too busy to read them."""
    s = RedisStore(redis_url, timeout=0.05)
    await s.start()
    try:
        for stall_after in (0, 3):
            pending = asyncio.gather(*(s.reserve(call(f"b{stall_after}-{i}"), [TOTAL], T0, 300)
                                       for i in range(200)))
            for _ in range(stall_after):
                await asyncio.sleep(0)  # let the round trip go out first (or not, with 0)
            time.sleep(0.15)  # the loop is stuck on other work, three times the store timeout
            results = await pending
            assert all(r.admitted for r in results)
        assert s.errors == 0
    finally:
        await s.close()


async def test_late_reserve_is_released_again(private_redis: RedisServer) -> None:
    """A reserve that Redis executed after its caller gave up must not keep the slot."""
    s = RedisStore(private_redis.url, timeout=0.05)
    await s.start()
    try:
        assert private_redis.proc is not None
        private_redis.proc.send_signal(signal.SIGSTOP)
        with pytest.raises(StoreError):
            await s.reserve(call("late"), [TOTAL, acct("acme", 3)], T0, 300)
        private_redis.proc.send_signal(signal.SIGCONT)  # before the round trip is given up
        deadline = time.monotonic() + 2
        while s.undone == 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert s.undone == 1
        await until_ok(s, 1.0)
        assert await s.profile_size("account", "acme", T0) == 0
        assert await s.get_call("late", T0) is None
        st = await s.stats(T0)
        assert (st.processed_dialogs, st.early_dialogs) == (0, 0)
    finally:
        await s.close()


async def test_reserve_lost_with_its_connection_is_released_after_recovery(
        private_redis: RedisServer) -> None:
    """The round trip is given up (connection dropped) after the reserve was sent: once Redis
    answers again, that reserve's admission, if it happened, is released; others are not."""
    s = RedisStore(private_redis.url, timeout=0.05)
    await s.start()
    try:
        assert (await s.reserve(call("kept"), [TOTAL, acct("acme", 3)], T0, 300)).admitted
        assert private_redis.proc is not None
        private_redis.proc.send_signal(signal.SIGSTOP)
        with pytest.raises(StoreError):
            await s.reserve(call("lost"), [TOTAL, acct("acme", 3)], T0, 300)
        with pytest.raises(StoreError):  # the same call id again: its token differs
            await s.reserve(call("kept"), [TOTAL, acct("acme", 3)], T0, 300)
        await asyncio.sleep(0.6)  # past the round-trip limit: the connection is dropped
        private_redis.proc.send_signal(signal.SIGCONT)
        await until_ok(s, 1.0)
        deadline = time.monotonic() + 2
        while await s.get_call("lost", T0) is not None and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert await s.get_call("lost", T0) is None
        assert await s.get_call("kept", T0) is not None
        assert await s.profile_size("account", "acme", T0) == 1
        assert (await s.stats(T0)).processed_dialogs == 1
    finally:
        await s.close()


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


# -- settings and Sentinel ---------------------------------------------------------------


def test_from_settings_and_factory() -> None:
    st = Settings(store="redis", redis_url="redis://127.0.0.1:6390/2", redis_prefix="pp",
                  store_timeout=0.2)
    s = RedisStore.from_settings(st)
    assert (s.url, s.prefix, s.timeout) == ("redis://127.0.0.1:6390/2", "pp", 0.2)
    assert s.profile_key("account", "acme") == "{pp}:k:account=acme"
    st2 = Settings(store="redis://127.0.0.1:6391/0")
    assert RedisStore.from_settings(st2).url == "redis://127.0.0.1:6391/0"
    st3 = Settings(store="redis", redis_sentinels=["127.0.0.1:26379"], redis_service="svc")
    s3 = make_store(st3, SystemClock())
    assert isinstance(s3, RedisStore) and s3.name == "redis"


def test_bad_addresses_raise_store_error() -> None:
    for url in ("redis://127.0.0.1:notaport/0", "http://127.0.0.1/", "redis+sentinel:///svc"):
        with pytest.raises(StoreError):
            RedisStore(url)
    with pytest.raises(StoreError):
        RedisStore("redis://127.0.0.1/0", timeout=0)


def test_parse_sentinel_url() -> None:
    assert parse_sentinel_url("redis+sentinel://h1:1,h2:2/svc/3") == (
        [("h1", 1), ("h2", 2)], "svc", 3, None, None)
    assert parse_sentinel_url("redis+sentinel://:pw@h1/svc") == ([("h1", 26379)], "svc", 0, None, "pw")
    with pytest.raises(StoreError):
        parse_sentinel_url("redis+sentinel:///svc")


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
        assert (await s.reserve(call("a"), [TOTAL], T0, 300)).admitted
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
                r = await s.reserve(call("b"), [TOTAL], T0, 300)
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
