"""The Redis store when things go wrong, on real redis-servers: down, hung (SIGSTOP), killed,
restarted empty, FLUSHALL, clocks that disagree, TLS; and undo, which must never release an
admission a later check confirmed.

Timing assertions are bounds with room for a loaded 2-core machine (`SLACK`).
"""

from __future__ import annotations

import asyncio
import random
import signal
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import redis.asyncio as aredis
from structlog.testing import capture_logs

from policy.clock import ManualClock
from policy.errors import StoreError
from policy.store.base import CallInfo, PlanEntry
from policy.store.redis import REBUILDING, RedisStore
from tests.conftest import TlsRedis, resume
from tests.helpers import RedisServer, free_port

pytestmark = pytest.mark.redis

T0 = 1_800_000_000.0
SLACK = 0.25  # scheduling slack on a loaded machine, on top of the store timeout
TOTAL = PlanEntry("total", None, None, False, "count-all")


def acct(value: str, limit: int | None = None) -> PlanEntry:
    return PlanEntry("account", value, limit, False, "account-cap")


ACME = [TOTAL, acct("acme", 3)]


def call(cid: str, account: str = "acme") -> CallInfo:
    return CallInfo(cid, f"sip:{cid}@example.com", "sip:100@example.com", account)


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


async def until(pred: Callable[[], bool], within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not pred():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.01)


async def timed(coro: Awaitable[Any]) -> tuple[Any, float]:
    """(result or the exception, seconds)."""
    t0 = time.perf_counter()
    try:
        res = await coro
    except StoreError as exc:
        res = exc
    return res, time.perf_counter() - t0


def stop_redis(server: RedisServer) -> None:
    assert server.proc is not None
    server.proc.send_signal(signal.SIGSTOP)


def cont_redis(server: RedisServer) -> None:
    resume(server)


# -- down, hung, restarted -------------------------------------------------------------------


async def test_redis_down_at_start_then_up() -> None:
    port = free_port()
    s = RedisStore(f"redis://127.0.0.1:{port}/0", timeout=0.05)
    await s.start()  # not fatal
    try:
        t0 = time.monotonic()
        with pytest.raises(StoreError):
            await s.reserve(call("a"), [TOTAL], T0, 300, "t")
        assert time.monotonic() - t0 < 0.05 + SLACK
        server = RedisServer(port=port).start()
        try:
            assert await until_ok(s, 1.5) < 1.5
            assert (await s.reserve(call("a"), [TOTAL], T0, 300, "t")).admitted
        finally:
            server.stop()
    finally:
        await s.close()


async def test_every_method_raises_store_error_within_the_bound(private_redis: RedisServer) -> None:
    s = RedisStore(private_redis.url, timeout=0.05)
    await s.start()
    try:
        await s.reserve(call("a"), [TOTAL], T0, 300, "t")
        private_redis.stop(signal.SIGKILL)
        ops = [
            lambda: s.reserve(call("b"), [TOTAL, acct("acme", 3)], T0, 300, "t"),
            lambda: s.answer("a", T0, 10), lambda: s.refresh("a", T0, 10),
            lambda: s.end("a", T0, "bye"), lambda: s.get_call("a", T0), lambda: s.set_var("a", "x", "1", T0),
            lambda: s.profile_size("total", None, T0), lambda: s.profile_list("total", None, T0),
            lambda: s.profile_list("account", "acme", T0), lambda: s.profile_values("account", T0),
            lambda: s.node_calls("", T0), lambda: s.stats(T0), lambda: s.sweep(T0),
        ]
        for op in ops:
            t0 = time.monotonic()
            with pytest.raises(StoreError):
                await op()
            assert time.monotonic() - t0 < 0.05 + SLACK
        assert s.info()["circuit"] == "down"
    finally:
        await s.close()


async def test_hung_redis_bounds_every_call_and_recovers(private_redis: RedisServer) -> None:
    s = RedisStore(private_redis.url, timeout=0.05)
    await s.start()
    try:
        assert (await s.reserve(call("a"), [TOTAL], T0, 300, "t")).admitted
        stop_redis(private_redis)  # accepts nothing, answers nothing
        t0 = time.monotonic()
        results = await asyncio.gather(*(s.reserve(call(f"h{i}"), [TOTAL], T0, 300, "t") for i in range(50)),
                                       return_exceptions=True)
        assert all(isinstance(r, StoreError) for r in results)
        assert time.monotonic() - t0 < 0.05 + SLACK
        for _ in range(3):  # later calls do not queue behind the hung socket: they fail at once
            t1 = time.monotonic()
            with pytest.raises(StoreError):
                await s.get_call("a", T0)
            assert time.monotonic() - t1 < 0.01 + SLACK
        assert s.info()["circuit"] in ("suspect", "down")
        cont_redis(private_redis)
        assert await until_ok(s, 1.5) < 1.5
        assert (await s.get_call("a", T0)) is not None
    finally:
        await s.close()


async def test_a_hung_redis_is_given_up_before_the_timeout(private_redis: RedisServer) -> None:
    """The store gives up on a hung Redis a few ms before `store.timeout` (pipe.ANSWER_MARGIN),
    so the service's on_store_error answer still leaves within the timeout of the request; on
    every operation, the store's own and the pipe's deadline alike (the best of three, as a busy
    machine only adds)."""
    s = RedisStore(private_redis.url, timeout=0.05)
    await s.start()
    try:
        took = []
        for i in range(3):
            assert (await s.reserve(call(f"w{i}"), ACME, T0, 300, "t")).admitted
            stop_redis(private_redis)
            try:
                res, secs = await timed(s.reserve(call(f"h{i}"), ACME, T0, 300, f"t{i}"))
            finally:
                cont_redis(private_redis)
            assert isinstance(res, StoreError)
            took.append(secs)
            await until_ok(s, 2.5)
        assert min(took) < 0.05, took
    finally:
        cont_redis(private_redis)
        await s.close()


async def test_sigstopped_redis_every_check_answered_within_the_bound(private_redis: RedisServer) -> None:
    """Checks at 500/s for 1.5 s while Redis is SIGSTOPped: every one is answered (StoreError)
    within the store timeout; after SIGCONT the store is exact again on its own."""
    s = RedisStore(private_redis.url, timeout=0.05)
    await s.start()
    try:
        stop_redis(private_redis)
        took: list[float] = []
        i = 0
        start = time.perf_counter()
        while time.perf_counter() - start < 1.5:
            i += 1
            res, secs = await timed(s.reserve(call(f"s{i}"), ACME, T0, 300, f"t{i}"))
            assert isinstance(res, StoreError)
            took.append(secs)
            await asyncio.sleep(max(0.0, start + i / 500 - time.perf_counter()))
        cont_redis(private_redis)
        took.sort()
        p99 = took[int(len(took) * 0.99)]
        print(f"SIGSTOP: {len(took)} checks, p50 {statistics.median(took) * 1e3:.3f} ms, "
              f"p99 {p99 * 1e3:.3f} ms, max {took[-1] * 1e3:.3f} ms")
        assert took[-1] < 0.05 + SLACK
        assert p99 < 0.05 + 0.02
        assert await until_ok(s, 2.5) < 2.5
        # nothing the unanswered checks did stays held (undone once Redis answered)
        await until(lambda: s.info()["undo_pending"] == 0, 3.0, "undos not applied")
        await asyncio.sleep(0.2)
        assert await s.profile_size("account", "acme", T0) == 0
    finally:
        await s.close()


async def test_redis_down_costs_little_cpu_and_reconnects_by_itself(private_redis: RedisServer) -> None:
    """With Redis stopped, a burst of checks each fails within the timeout and costs less CPU
    than a check that reaches Redis; the store reconnects in the background (no request needed)."""
    s = RedisStore(private_redis.url, timeout=0.05)
    await s.start()
    n = 300
    try:
        await s.reserve(call("warm"), ACME, T0, 300, "t")

        async def burst(tag: str) -> tuple[float, list[tuple[Any, float]]]:
            cpu0 = time.process_time()
            out = await asyncio.gather(*(timed(s.reserve(call(f"{tag}{i}", f"a{i}"), ACME, T0, 300, f"t{i}"))
                                         for i in range(n)))
            return (time.process_time() - cpu0) / n, out

        up_cpu, up = await burst("u")
        assert all(not isinstance(r, StoreError) for r, _ in up)
        port = private_redis.port
        private_redis.stop(signal.SIGKILL)
        await until(lambda: s.info()["circuit"] == "down", 1.0, "the store did not notice")
        down_cpu, down = await burst("d")
        assert all(isinstance(r, StoreError) for r, _ in down)
        assert max(secs for _, secs in down) < 0.05 + SLACK
        print(f"CPU per check: Redis up {up_cpu * 1e6:.1f} us, Redis down {down_cpu * 1e6:.1f} us "
              f"({down_cpu / up_cpu:.2f}x)")
        assert down_cpu < 5 * up_cpu
        back = RedisServer(port=port).start()
        try:
            await until(lambda: s.info()["circuit"] == "up", 2.0, "no reconnect in the background")
            assert s.info()["connects"] >= 2
            r = await s.reserve(call("after"), ACME, T0, 300, "t")  # Redis restarted empty
            assert r.admitted or r.sizes  # (or rebuilding: see the data-loss tests)
        except StoreError as exc:
            assert str(exc) == REBUILDING
        finally:
            back.stop()
    finally:
        await s.close()


async def test_redis_restart_is_detected_as_data_loss_and_recovers(private_redis: RedisServer) -> None:
    s = RedisStore(private_redis.url, timeout=0.05)
    await s.start()
    try:
        assert (await s.reserve(call("a"), [TOTAL], T0, 300, "t")).admitted
        epoch = s.info()["epoch"]
        port = private_redis.port
        private_redis.stop(signal.SIGKILL)
        with pytest.raises(StoreError):
            await s.get_call("a", T0)
        with capture_logs() as logs:
            restarted = RedisServer(port=port).start()  # empty: no scripts, no data
            try:
                await until(lambda: s.info()["data_losses"] == 1 and not s.info()["rebuilding"], 2.0,
                            "the loss was not detected on reconnect")
                assert (await s.reserve(call("b"), [TOTAL], T0, 300, "t")).admitted
                assert await s.get_call("a", T0) is None  # gone with the data
            finally:
                restarted.stop()
        lost = [e for e in logs if e["event"] == "redis_data_lost"]
        assert len(lost) == 1 and lost[0]["log_level"] == "error" and "reconnect" in lost[0]["detected"]
        assert any(e["event"] == "redis_rebuilt" and e["rebuilt"] is False for e in logs)
        assert s.info()["epoch"] != epoch
    finally:
        await s.close()


async def test_busy_event_loop_is_not_a_slow_redis(redis_url: str) -> None:
    """Replies Redis sent in time count even when our own loop is too busy to read them."""
    s = RedisStore(redis_url, timeout=0.05)
    await s.start()
    try:
        for stall_after in (0, 3):
            pending = asyncio.gather(*(s.reserve(call(f"b{stall_after}-{i}"), [TOTAL], T0, 300, "t")
                                       for i in range(200)))
            for _ in range(stall_after):
                await asyncio.sleep(0)  # let the round trip go out first (or not, with 0)
            time.sleep(0.15)  # the loop is stuck on other work, three times the store timeout
            results = await pending
            assert all(r.admitted for r in results)
        assert s.errors == 0 and s.info()["circuit"] == "up"
    finally:
        await s.close()


# -- undo --------------------------------------------------------------------------------


async def test_late_reserve_is_released_again(private_redis: RedisServer) -> None:
    """A reserve that Redis executed after its caller gave up must not keep the slot."""
    s = RedisStore(private_redis.url, timeout=0.05)
    await s.start()
    try:
        stop_redis(private_redis)
        with pytest.raises(StoreError):
            await s.reserve(call("late"), ACME, T0, 300, "t1")
        cont_redis(private_redis)  # before the round trip is given up
        await until(lambda: s.undone == 1, 2.0, "the late reserve was not undone")
        await until_ok(s, 1.0)
        assert await s.profile_size("account", "acme", T0) == 0
        assert await s.get_call("late", T0) is None
        st = await s.stats(T0)
        assert (st.processed_dialogs, st.early_dialogs) == (0, 0)
    finally:
        await s.close()


async def test_reserve_lost_with_its_connection_is_released_after_recovery(
        private_redis: RedisServer) -> None:
    """The round trip is given up (connection dropped) after the reserves were sent: once Redis
    answers again, what each did is taken back by its token: a new call is released, a repeated
    check of a held call hands the call back to the admission that held it."""
    s = RedisStore(private_redis.url, timeout=0.05)
    await s.start()
    try:
        assert (await s.reserve(call("kept"), ACME, T0, 300, "k1")).admitted
        stop_redis(private_redis)
        both = await asyncio.gather(s.reserve(call("lost"), ACME, T0, 300, "l1"),
                                    s.reserve(call("kept"), ACME, T0, 300, "k2"),  # a repeated check
                                    return_exceptions=True)
        assert all(isinstance(r, StoreError) for r in both)
        await asyncio.sleep(0.6)  # past the hang limit: the connection is dropped
        assert s.info()["undo_pending"] == 2
        cont_redis(private_redis)
        await until_ok(s, 1.5)
        await until(lambda: s.info()["undo_pending"] == 0, 2.0, "undos not sent")
        await until(lambda: s.undone == 1 and s.handed_back == 1, 2.0, "undos not applied")
        assert await s.get_call("lost", T0) is None
        kept = await s.get_call("kept", T0)
        assert kept is not None and kept.token == "k1"
        assert await s.profile_size("account", "acme", T0) == 1
        assert (await s.stats(T0)).processed_dialogs == 1
    finally:
        await s.close()


async def test_undo_never_releases_an_admission_a_retry_confirmed(private_redis: RedisServer) -> None:
    """Issue 8's scenario: acme 2 of 3; Redis SIGSTOPped; check A -> error after the bound;
    SIGCONT after 1 s and retry A at once (from another instance, which reaches Redis before the
    first instance reconnects): the retry is `duplicate` and takes the admission over, so the
    parked undo of the first reserve changes nothing. acme stays 3 and a fourth call is refused."""
    a = RedisStore(private_redis.url, prefix="u8", timeout=0.05)
    b = RedisStore(private_redis.url, prefix="u8", timeout=0.5)
    await a.start()
    await b.start()
    try:
        for cid in ("x1", "x2"):
            assert (await a.reserve(call(cid), ACME, T0, 300, f"t-{cid}")).admitted
        stop_redis(private_redis)
        res, secs = await timed(a.reserve(call("A"), ACME, T0, 300, "first"))
        assert isinstance(res, StoreError) and secs < 0.05 + SLACK
        await asyncio.sleep(1.0)
        assert a.info()["undo_pending"] == 1  # a dropped its hung connection, A's undo is parked
        retry = asyncio.ensure_future(b.reserve(call("A"), ACME, T0, 300, "second"))
        await asyncio.sleep(0.05)  # b's retry is on the wire before Redis runs again
        cont_redis(private_redis)
        r = await retry
        assert r.admitted and r.duplicate and r.record is not None and r.record.token == "second"
        await until(lambda: a.info()["undo_pending"] == 0 and a.info()["circuit"] == "up", 3.0, "no undo")
        await asyncio.sleep(0.2)
        held = await b.get_call("A", T0)
        assert held is not None and held.token == "second"
        assert a.undone == 0
        assert await b.profile_size("account", "acme", T0) == 3
        assert not (await b.reserve(call("D"), ACME, T0, 300, "d")).admitted
        assert (await b.end("A", T0, "bye", "first")) is not None  # a stale end changes nothing
        assert await b.profile_size("account", "acme", T0) == 3
    finally:
        await a.close()
        await b.close()


async def test_undo_of_a_late_takeover_hands_the_call_back(private_redis: RedisServer) -> None:
    """A repeated check whose answer came too late had taken the call over: its undo gives the
    call back to the admission that held it (whose later notices must still apply)."""
    s = RedisStore(private_redis.url, timeout=0.05)
    await s.start()
    try:
        assert (await s.reserve(call("A"), ACME, T0, 300, "confirmed")).admitted
        stop_redis(private_redis)
        with pytest.raises(StoreError):
            await s.reserve(call("A"), ACME, T0, 300, "unanswered")
        cont_redis(private_redis)
        await until(lambda: s.handed_back == 1, 2.0, "the takeover was not undone")
        rec = await s.get_call("A", T0)
        assert rec is not None and rec.token == "confirmed"
        assert await s.end("A", T0, "bye", "confirmed") is not None
        assert await s.profile_size("account", "acme", T0) == 0
    finally:
        await s.close()


# -- data loss -----------------------------------------------------------------------------


async def test_redis_restarted_empty_under_load_is_rebuilt_and_never_over_cap(
        private_redis: RedisServer) -> None:
    """Checks run against acme (cap 3) from 6 workers; Redis restarts empty (no persistence)
    mid-load. The loss is detected, checks fail (on_store_error) while the store rebuilds from
    the "proxy" (the calls up, re-added by the reconciliation callback), and the calls up never
    exceed the cap, before or after."""
    s = RedisStore(private_redis.url, prefix="dl", timeout=0.1, connect_timeout=0.5)
    up: dict[str, str] = {}  # the proxy's view: calls up -> token
    peak = 0
    rebuilding_errors = 0
    reconciled: list[int] = []

    async def reconcile() -> None:
        await asyncio.sleep(0.2)  # asking the proxies takes a while
        reconciled.append(len(up))
        for cid, tok in list(up.items()):
            await s.reserve(call(cid), ACME, T0, 300, tok, force=True)

    s.on_data_loss = reconcile
    await s.start()
    stop = False

    async def worker(w: int) -> None:
        nonlocal peak, rebuilding_errors
        rng = random.Random(w)
        i = 0
        while not stop:
            i += 1
            cid = f"w{w}-{i}"
            try:
                r = await s.reserve(call(cid), ACME, T0, 300, cid)
            except StoreError as exc:
                rebuilding_errors += str(exc) == REBUILDING
                await asyncio.sleep(0.005)
                continue
            if not r.admitted:
                await asyncio.sleep(0.002)
                continue
            up[cid] = cid
            peak = max(peak, len(up))
            await asyncio.sleep(rng.uniform(0.0, 0.03))
            while True:  # the proxy ends the call; a notice is retried until the store takes it
                try:
                    await s.end(cid, T0, "bye", cid)
                    break
                except StoreError:
                    await asyncio.sleep(0.01)
            del up[cid]

    with capture_logs() as logs:
        workers = [asyncio.ensure_future(worker(w)) for w in range(6)]
        await asyncio.sleep(0.5)
        port = private_redis.port
        private_redis.stop(signal.SIGKILL)
        restarted = RedisServer(port=port).start()
        try:
            await until(lambda: s.info()["data_losses"] == 1, 3.0, "the loss was not detected")
            await until(lambda: not s.info()["rebuilding"], 3.0, "the rebuild did not finish")
            await asyncio.sleep(0.5)
            stop = True
            await asyncio.gather(*workers)
            assert peak <= 3
            assert rebuilding_errors > 0  # checks followed on_store_error while rebuilding
            assert reconciled and await s.profile_size("account", "acme", T0) == len(up) == 0
        finally:
            stop = True
            restarted.stop()
            await s.close()
    events = [e["event"] for e in logs]
    assert events.count("redis_data_lost") == 1
    rebuilt = [e for e in logs if e["event"] == "redis_rebuilt"]
    assert len(rebuilt) == 1 and rebuilt[0]["rebuilt"] is True and rebuilt[0]["seconds"] >= 0.2
    assert s.info()["data_losses"] == 1


async def test_flushall_is_caught_on_the_check_path(redis_url: str) -> None:
    """FLUSHALL between two checks (no reconnect): the next reserve sees the epoch marker gone,
    admits nothing and raises; the store rebuilds (no callback: at once) and trusts Redis again."""
    s = RedisStore(redis_url, prefix=f"f{uuid.uuid4().hex[:6]}", timeout=0.5)
    await s.start()
    raw = aredis.Redis.from_url(redis_url)
    try:
        for cid in ("x1", "x2", "x3"):
            assert (await s.reserve(call(cid), ACME, T0, 300, "t")).admitted
        epoch = s.info()["epoch"]
        await raw.flushall()
        with capture_logs() as logs:
            with pytest.raises(StoreError, match="lost its data"):
                await s.reserve(call("x4"), ACME, T0, 300, "t")
            await until(lambda: not s.info()["rebuilding"], 2.0, "no rebuild")
        assert [e["detected"] for e in logs if e["event"] == "redis_data_lost"] == \
            ["reserve: the epoch marker is gone"]
        assert s.info()["data_losses"] == 1 and s.info()["epoch"] != epoch
        assert (await s.reserve(call("x4"), ACME, T0, 300, "t")).admitted
    finally:
        await raw.aclose()
        await s.close()


async def test_flushall_is_caught_by_the_sweep_too(redis_url: str) -> None:
    """With no checks coming, the periodic sweep notices the loss."""
    s = RedisStore(redis_url, prefix=f"f{uuid.uuid4().hex[:6]}", timeout=0.5)
    await s.start()
    raw = aredis.Redis.from_url(redis_url)
    try:
        await raw.flushall()
        assert await s.sweep(T0) == []
        assert s.info()["data_losses"] == 1
    finally:
        await raw.aclose()
        await s.close()


async def test_rebuilding_refuses_checks_but_takes_forced_reserves(redis_url: str) -> None:
    """While the callback runs, a check raises (on_store_error) but reconciliation's forced
    reserves and the other operations work; two instances adopt one new marker."""
    prefix = f"r{uuid.uuid4().hex[:6]}"
    a = RedisStore(redis_url, prefix=prefix, timeout=0.5)
    b = RedisStore(redis_url, prefix=prefix, timeout=0.5)
    gate = asyncio.Event()
    inside: list[Any] = []

    async def reconcile() -> None:
        with pytest.raises(StoreError, match="lost its data"):
            await a.reserve(call("new"), ACME, T0, 300, "t")
        inside.append(await a.reserve(call("up1"), ACME, T0, 300, "u", force=True))
        inside.append(await a.profile_size("account", "acme", T0))
        await gate.wait()

    a.on_data_loss = reconcile
    await a.start()
    await b.start()
    raw = aredis.Redis.from_url(redis_url)
    try:
        await raw.flushall()
        with pytest.raises(StoreError):
            await a.reserve(call("x"), ACME, T0, 300, "t")
        await until(lambda: len(inside) == 2, 2.0, "the callback did not run")
        assert inside[0].admitted and inside[1] == 1
        assert a.info()["state"] == "rebuilding"
        with pytest.raises(StoreError):  # b notices too (the marker changed under it)
            await b.reserve(call("y"), ACME, T0, 300, "t")
        await until(lambda: not b.info()["rebuilding"], 2.0, "b did not rebuild")
        gate.set()
        await until(lambda: not a.info()["rebuilding"], 2.0, "a did not finish")
        assert a.info()["epoch"] == b.info()["epoch"]
        assert (await a.reserve(call("z"), ACME, T0, 300, "t")).admitted
        assert a.info()["data_losses"] == b.info()["data_losses"] == 1
    finally:
        await raw.aclose()
        await a.close()
        await b.close()


# -- one clock for leases --------------------------------------------------------------------


async def test_clocks_400s_apart_keep_exact_leases(redis_url: str) -> None:
    """Two instances whose clocks differ by 400 s: each scores leases in Redis's time (offset
    measured on connect), so neither expires the other's calls early, nor keeps them late."""
    prefix = f"c{uuid.uuid4().hex[:6]}"
    ca, cb = ManualClock(T0), ManualClock(T0 + 400)
    a = RedisStore(redis_url, prefix=prefix, timeout=0.5, clock=ca)
    b = RedisStore(redis_url, prefix=prefix, timeout=0.5, clock=cb)
    await a.start()
    await b.start()
    try:
        plan = [acct("acme", 1)]
        assert (await a.reserve(call("x"), plan, ca.now(), 300, "t")).admitted  # behind admits
        assert (await b.reserve(call("y", "beta"), [acct("beta", 1)], cb.now(), 300, "t")).admitted  # ahead
        assert abs(a.info()["clock_offset"] - b.info()["clock_offset"] - 400) < 0.5
        for clock in (ca, cb):
            clock.advance(299)
        # ahead does not expire behind's call, nor behind ahead's
        assert not (await b.reserve(call("z"), plan, cb.now(), 300, "t")).admitted
        assert not (await a.reserve(call("w", "beta"), [acct("beta", 1)], ca.now(), 300, "t")).admitted
        assert await b.sweep(cb.now()) == [] and await a.sweep(ca.now()) == []
        seen_by_b = await b.get_call("x", cb.now())
        assert seen_by_b is not None and abs(seen_by_b.expires - (T0 + 400 + 300)) < 0.5  # in b's clock
        for clock in (ca, cb):
            clock.advance(2)
        # both leases ended by both clocks: each expiry reported once
        expired = await b.sweep(cb.now()) + await a.sweep(ca.now())
        assert sorted(r.call_id for r in expired) == ["x", "y"]
        assert (await b.reserve(call("z"), plan, cb.now(), 300, "t")).admitted
    finally:
        await a.close()
        await b.close()


# -- TLS -------------------------------------------------------------------------------------


async def test_tls_connects_with_default_timeouts(tls_redis: TlsRedis) -> None:
    """rediss:// with mutual TLS, default op and connect timeouts (the handshake is not bound
    by the 50 ms op timeout)."""
    s = RedisStore(tls_redis.url())
    await s.start()
    try:
        info = s.info()
        assert info["circuit"] == "up" and info["address"].startswith("rediss://"), info
        r = await s.reserve(call("a"), ACME, T0, 300, "t")
        assert r.admitted and await s.profile_size("account", "acme", T0) == 1
        assert await s.end("a", T0, "bye") is not None
    finally:
        await s.close()


async def test_tls_with_an_untrusted_server_fails_fast(tls_redis: TlsRedis) -> None:
    """A server certificate the client does not trust: no connection, and checks fail at once."""
    url = f"rediss://127.0.0.1:{tls_redis.port}/0?ssl_certfile={tls_redis.client_cert}" \
          f"&ssl_keyfile={tls_redis.client_key}"  # system CAs only
    s = RedisStore(url, connect_timeout=0.5)
    await s.start()
    try:
        assert s.info()["circuit"] == "down" and "certificate" in (s.info()["reason"] or "").lower()
        res, secs = await timed(s.reserve(call("a"), ACME, T0, 300, "t"))
        assert isinstance(res, StoreError) and secs < 0.05
    finally:
        await s.close()


@pytest.mark.parametrize("pause", [0.2, 0.8])  # under / over the hang limit (connection kept / dropped)
async def test_a_burst_of_unanswered_reserves_leaves_nothing_held(private_redis: RedisServer, pause: float) -> None:
    """300 reserves on the wire when Redis stops: every caller gets StoreError within the bound;
    once Redis runs again each one that was admitted late is undone: nothing stays held. (With
    the connection dropped, the reserves still in our send buffer never reach Redis: their undos
    find nothing.)"""
    s = RedisStore(private_redis.url, timeout=0.05)
    await s.start()
    try:
        stop_redis(private_redis)
        t0 = time.monotonic()
        res = await asyncio.gather(*(s.reserve(call(f"b{i}", f"a{i % 30}"), [TOTAL, acct(f"a{i % 30}", 10)],
                                               T0, 300, f"t{i}") for i in range(300)), return_exceptions=True)
        assert all(isinstance(r, StoreError) for r in res)
        assert time.monotonic() - t0 < 0.05 + SLACK
        await asyncio.sleep(pause)
        cont_redis(private_redis)
        await until_ok(s, 2.0)
        await until(lambda: s.info()["undo_pending"] == 0, 3.0, "undos not sent")
        deadline = time.monotonic() + 3
        while await s.profile_size("total", None, T0) != 0:  # (the last undos' replies)
            assert time.monotonic() < deadline, "reserves left held"
            await asyncio.sleep(0.05)
        assert s.undone > 0
        assert await s.profile_size("account", None, T0) == 0
        st = await s.stats(T0)
        assert (st.processed_dialogs, st.early_dialogs) == (0, 0)
    finally:
        await s.close()
