"""The counter-store contract: every backend must pass these unchanged."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest

from policy.store.base import CallInfo, CounterStore, PlanEntry
from policy.store.embedded import EmbeddedStore

T0 = 1_800_000_000.0


@pytest.fixture(params=["embedded", "redis"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[CounterStore]:
    """Each backend in turn; the Redis one on a private redis-server."""
    if request.param == "embedded":
        s: CounterStore = EmbeddedStore()
    else:
        url = request.getfixturevalue("redis_url")
        from policy.store.redis import RedisStore

        s = RedisStore(url, prefix=f"t{uuid.uuid4().hex[:8]}", timeout=0.5)
    await s.start()
    yield s
    await s.close()


def acct(value: str, limit: int | None = None, shadow: bool = False) -> PlanEntry:
    """An account plan entry."""
    return PlanEntry("account", value, limit, shadow, "account-cap")


TOTAL = PlanEntry("total", None, None, False, "count-all")


def call(cid: str, account: str = "acme") -> CallInfo:
    """A call with recognisable from/to."""
    return CallInfo(cid, f"sip:{cid}@example.com", "sip:100@example.com", account)


async def test_reserve_joins_every_key_and_reports_sizes(store: CounterStore) -> None:
    """An admitted call is counted in each key of its plan; sizes include it."""
    plan = [TOTAL, acct("acme", 3)]
    r = await store.reserve(call("a"), plan, T0, 300)
    assert (r.admitted, r.duplicate, r.blocked, r.sizes) == (True, False, None, [1, 1])
    assert r.record is not None and r.record.state == "early"
    assert await store.profile_size("total", None, T0) == 1
    assert await store.profile_size("account", "acme", T0) == 1
    assert await store.profile_size("account", "other", T0) == 0


async def test_limit_refuses_and_joins_nothing(store: CounterStore) -> None:
    """All or nothing: a refused call joins no key, not even the join-only ones."""
    plan = [TOTAL, acct("acme", 2)]
    for cid in ("a", "b"):
        assert (await store.reserve(call(cid), plan, T0, 300)).admitted
    r = await store.reserve(call("c"), plan, T0, 300)
    assert (r.admitted, r.blocked, r.sizes) == (False, 1, [2, 2])
    assert await store.profile_size("total", None, T0) == 2
    assert await store.get_call("c", T0) is None


async def test_first_blocked_limit_is_reported(store: CounterStore) -> None:
    """When two limits are full, the first in plan order is the one reported."""
    user = PlanEntry("user", "u@x", 1, False, "user-cap")
    assert (await store.reserve(call("a"), [acct("acme", 1), user], T0, 300)).admitted
    r = await store.reserve(call("b"), [acct("acme", 1), user], T0, 300)
    assert r.blocked == 0


async def test_limit_zero_refuses_everything(store: CounterStore) -> None:
    """A limit of 0 admits nothing."""
    r = await store.reserve(call("a"), [acct("acme", 0)], T0, 300)
    assert not r.admitted and r.blocked == 0


async def test_shadow_limit_never_refuses(store: CounterStore) -> None:
    """A shadow limit is counted but does not refuse."""
    plan = [acct("acme", 1, shadow=True)]
    assert (await store.reserve(call("a"), plan, T0, 300)).admitted
    r = await store.reserve(call("b"), plan, T0, 300)
    assert r.admitted and r.sizes == [2]


async def test_duplicate_check_counts_once(store: CounterStore) -> None:
    """A repeated reserve for a held call is admitted again without counting twice."""
    plan = [TOTAL, acct("acme", 1)]
    assert (await store.reserve(call("a"), plan, T0, 300)).admitted
    r = await store.reserve(call("a"), plan, T0 + 1, 300)
    assert r.admitted and r.duplicate and r.sizes == [1, 1]
    assert await store.profile_size("account", "acme", T0) == 1


async def test_six_profiles_and_repeated_key(store: CounterStore) -> None:
    """A call joining six keys (one twice) is counted once per key and released from all."""
    plan = [TOTAL, acct("acme", 5), PlanEntry("user", "u@x", 4, False, "user-cap"),
            PlanEntry("type", "local", None, False, "count-all"), PlanEntry("local", None, None, False, "x"),
            PlanEntry("emergency", None, 9, True, "s"), acct("acme", 10)]
    r = await store.reserve(call("a"), plan, T0, 300)
    assert r.admitted and r.sizes == [1, 1, 1, 1, 1, 1, 1]
    assert r.record is not None and len(r.record.profiles) == 6
    rec = await store.end("a", T0, "bye")
    assert rec is not None
    for profile, value in [("total", None), ("account", "acme"), ("user", "u@x"), ("type", "local"),
                           ("local", None), ("emergency", None)]:
        assert await store.profile_size(profile, value, T0) == 0


async def test_answer_refresh_end_lifecycle(store: CounterStore) -> None:
    """check -> answer -> refresh -> end, with states and leases."""
    await store.reserve(call("a"), [acct("acme", 3)], T0, 300)
    rec = await store.answer("a", T0 + 5, 3600)
    assert rec is not None and rec.state == "active" and rec.start_ts == T0 + 5
    assert rec.expires == T0 + 5 + 3600
    rec = await store.refresh("a", T0 + 100, 60)
    assert rec is not None and rec.expires == T0 + 160 and rec.state == "active"
    stats = await store.stats(T0 + 100)
    assert (stats.active_dialogs, stats.early_dialogs) == (1, 0)
    rec = await store.end("a", T0 + 120, "bye")
    assert rec is not None and rec.call_id == "a"
    assert await store.end("a", T0 + 121, "bye") is None
    assert await store.profile_size("account", "acme", T0 + 121) == 0


async def test_end_before_answer_and_answer_after_end(store: CounterStore) -> None:
    """Ending an early call releases it; answering or refreshing it afterwards is a no-op."""
    await store.reserve(call("a"), [acct("acme", 3)], T0, 300)
    assert await store.end("a", T0 + 1, "cancel") is not None
    assert await store.answer("a", T0 + 2, 3600) is None
    assert await store.refresh("a", T0 + 2, 3600) is None
    assert await store.profile_size("account", "acme", T0 + 2) == 0
    stats = await store.stats(T0 + 2)
    assert stats.failed_dialogs == 1 and stats.processed_dialogs == 1


async def test_unknown_calls_are_no_ops(store: CounterStore) -> None:
    """answer/refresh/end/get of an unknown call return None and change nothing."""
    assert await store.answer("nope", T0, 10) is None
    assert await store.refresh("nope", T0, 10) is None
    assert await store.end("nope", T0, "bye") is None
    assert await store.get_call("nope", T0) is None
    assert (await store.stats(T0)).processed_dialogs == 0


async def test_early_lease_expires(store: CounterStore) -> None:
    """A call never answered drops out at its early lease and frees its slot."""
    plan = [acct("acme", 1)]
    assert (await store.reserve(call("a"), plan, T0, 300)).admitted
    assert not (await store.reserve(call("b"), plan, T0 + 299, 300)).admitted
    assert (await store.reserve(call("c"), plan, T0 + 300, 300)).admitted
    assert await store.get_call("a", T0 + 300) is None
    assert (await store.stats(T0 + 300)).expired_dialogs == 1


async def test_lost_bye_expires_at_answered_lease(store: CounterStore) -> None:
    """An answered call whose BYE is lost is released at its lease, and refresh pushes it back."""
    await store.reserve(call("a"), [acct("acme", 1)], T0, 300)
    await store.answer("a", T0, 100)
    await store.refresh("a", T0 + 90, 100)
    assert await store.profile_size("account", "acme", T0 + 150) == 1
    assert await store.profile_size("account", "acme", T0 + 190) == 0
    assert (await store.stats(T0 + 190)).expired_dialogs == 1


async def test_sweep_drops_expired_calls(store: CounterStore) -> None:
    """sweep() releases every ended lease and says how many."""
    for cid in ("a", "b", "c"):
        await store.reserve(call(cid), [TOTAL], T0, 10)
    await store.answer("c", T0, 1000)
    assert await store.sweep(T0 + 11) == 2
    assert await store.sweep(T0 + 12) == 0
    assert await store.profile_size("total", None, T0 + 12) == 1


async def test_profile_list_and_whole_profile(store: CounterStore) -> None:
    """profile_list shows the calls of a value, or of every value when none is given."""
    await store.reserve(call("b", "acme"), [acct("acme")], T0, 300)
    await store.reserve(call("a", "acme"), [acct("acme")], T0, 300)
    await store.reserve(call("z", "beta"), [acct("beta")], T0, 300)
    listed = await store.profile_list("account", "acme", T0)
    assert [c.call_id for c in listed] == ["a", "b"]
    assert listed[0].from_uri == "sip:a@example.com" and listed[0].account == "acme"
    assert listed[0].profiles == [("account", "acme")]
    assert [c.call_id for c in await store.profile_list("account", None, T0)] == ["a", "b", "z"]
    assert await store.profile_size("account", None, T0) == 3


async def test_stats_counts(store: CounterStore) -> None:
    """processed/failed/expired/active/early follow the calls' lives."""
    await store.reserve(call("a"), [TOTAL], T0, 300)
    await store.reserve(call("b"), [TOTAL], T0, 300)
    await store.reserve(call("c"), [TOTAL], T0, 5)
    await store.answer("a", T0, 1000)
    await store.end("b", T0, "failed")
    s = await store.stats(T0 + 10)
    assert s.to_json() == {"active_dialogs": 1, "early_dialogs": 0, "processed_dialogs": 3,
                           "expired_dialogs": 1, "failed_dialogs": 1}


async def test_concurrent_reserves_never_exceed_the_limit(store: CounterStore) -> None:
    """Hundreds of concurrent reserves for one key admit exactly the limit."""
    plan = [TOTAL, acct("acme", 10)]
    results = await asyncio.gather(*(store.reserve(call(f"c{i}"), plan, T0, 300) for i in range(300)))
    assert sum(r.admitted for r in results) == 10
    assert await store.profile_size("account", "acme", T0) == 10
    assert await store.profile_size("total", None, T0) == 10
    await asyncio.gather(*(store.end(f"c{i}", T0, "bye") for i in range(300)))
    assert await store.profile_size("total", None, T0) == 0
