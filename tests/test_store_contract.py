"""The counter-store contract: every backend must pass these unchanged."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest

from policy.store.base import CallInfo, CounterStore, PlanEntry, RateEntry, call_uid
from policy.store.embedded import EmbeddedStore

T0 = 1_800_000_000.0


@pytest.fixture(params=["embedded", "redis", "redis-cluster"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[CounterStore]:
    """Each backend in turn; the Redis one on a private redis-server, the cluster one on the
    session's private Redis Cluster (3 primaries + 3 replicas), each with a prefix of its own."""
    if request.param == "embedded":
        s: CounterStore = EmbeddedStore()
    elif request.param == "redis":
        url = request.getfixturevalue("redis_url")
        from policy.store.redis import RedisStore

        s = RedisStore(url, prefix=f"t{uuid.uuid4().hex[:8]}", timeout=0.5)
    else:
        cluster = request.getfixturevalue("redis_cluster")
        from policy.store.redis.cluster import RedisClusterStore

        s = RedisClusterStore(cluster.url, prefix=f"t{uuid.uuid4().hex[:8]}", timeout=0.5)
    await s.start()
    yield s
    await s.close()


def acct(value: str, limit: int | None = None, shadow: bool = False) -> PlanEntry:
    """An account plan entry."""
    return PlanEntry("account", value, limit, shadow, "account-cap")


TOTAL = PlanEntry("total", None, None, False, "count-all")


def call(cid: str, account: str = "acme", from_tag: str = "", node: str = "") -> CallInfo:
    """A call with recognisable from/to."""
    return CallInfo(cid, f"sip:{cid}@example.com", "sip:100@example.com", account, from_tag, node)


async def test_reserve_joins_every_key_and_reports_sizes(store: CounterStore) -> None:
    """An admitted call is counted in each key of its plan; sizes include it."""
    plan = [TOTAL, acct("acme", 3)]
    r = await store.reserve(call("a"), plan, T0, 300, "tok")
    assert (r.admitted, r.duplicate, r.blocked, r.sizes) == (True, False, None, [1, 1])
    assert r.record is not None and r.record.state == "early"
    assert await store.profile_size("total", None, T0) == 1
    assert await store.profile_size("account", "acme", T0) == 1
    assert await store.profile_size("account", "other", T0) == 0


async def test_limit_refuses_and_joins_nothing(store: CounterStore) -> None:
    """All or nothing: a refused call joins no key, not even the join-only ones."""
    plan = [TOTAL, acct("acme", 2)]
    for cid in ("a", "b"):
        assert (await store.reserve(call(cid), plan, T0, 300, "tok")).admitted
    r = await store.reserve(call("c"), plan, T0, 300, "tok")
    assert (r.admitted, r.blocked, r.sizes) == (False, 1, [2, 2])
    assert await store.profile_size("total", None, T0) == 2
    assert await store.get_call("c", T0) is None


async def test_first_blocked_limit_is_reported(store: CounterStore) -> None:
    """When two limits are full, the first in plan order is the one reported."""
    user = PlanEntry("user", "u@x", 1, False, "user-cap")
    assert (await store.reserve(call("a"), [acct("acme", 1), user], T0, 300, "tok")).admitted
    r = await store.reserve(call("b"), [acct("acme", 1), user], T0, 300, "tok")
    assert r.blocked == 0


async def test_limit_zero_refuses_everything(store: CounterStore) -> None:
    """A limit of 0 admits nothing."""
    r = await store.reserve(call("a"), [acct("acme", 0)], T0, 300, "tok")
    assert not r.admitted and r.blocked == 0


async def test_shadow_limit_never_refuses(store: CounterStore) -> None:
    """A shadow limit is counted but does not refuse."""
    plan = [acct("acme", 1, shadow=True)]
    assert (await store.reserve(call("a"), plan, T0, 300, "tok")).admitted
    r = await store.reserve(call("b"), plan, T0, 300, "tok")
    assert r.admitted and r.sizes == [2]


async def test_duplicate_check_counts_once(store: CounterStore) -> None:
    """A repeated reserve for a held call is admitted again without counting twice."""
    plan = [TOTAL, acct("acme", 1)]
    assert (await store.reserve(call("a"), plan, T0, 300, "tok")).admitted
    r = await store.reserve(call("a"), plan, T0 + 1, 300, "tok")
    assert r.admitted and r.duplicate and r.sizes == [1, 1]
    assert await store.profile_size("account", "acme", T0) == 1


async def test_six_profiles_and_repeated_key(store: CounterStore) -> None:
    """A call joining six keys (one twice) is counted once per key and released from all."""
    plan = [TOTAL, acct("acme", 5), PlanEntry("user", "u@x", 4, False, "user-cap"),
            PlanEntry("type", "local", None, False, "count-all"), PlanEntry("local", None, None, False, "x"),
            PlanEntry("emergency", None, 9, True, "s"), acct("acme", 10)]
    r = await store.reserve(call("a"), plan, T0, 300, "tok")
    assert r.admitted and r.sizes == [1, 1, 1, 1, 1, 1, 1]
    assert r.record is not None and len(r.record.profiles) == 6
    rec = await store.end("a", T0, "bye")
    assert rec is not None
    for profile, value in [("total", None), ("account", "acme"), ("user", "u@x"), ("type", "local"),
                           ("local", None), ("emergency", None)]:
        assert await store.profile_size(profile, value, T0) == 0


async def test_answer_refresh_end_lifecycle(store: CounterStore) -> None:
    """check -> answer -> refresh -> end, with states and leases."""
    await store.reserve(call("a"), [acct("acme", 3)], T0, 300, "tok")
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
    await store.reserve(call("a"), [acct("acme", 3)], T0, 300, "tok")
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
    assert (await store.reserve(call("a"), plan, T0, 300, "tok")).admitted
    assert not (await store.reserve(call("b"), plan, T0 + 299, 300, "tok")).admitted
    assert (await store.reserve(call("c"), plan, T0 + 300, 300, "tok")).admitted
    assert await store.get_call("a", T0 + 300) is None
    assert (await store.stats(T0 + 300)).expired_dialogs == 1


async def test_lost_bye_expires_at_answered_lease(store: CounterStore) -> None:
    """An answered call whose BYE is lost is released at its lease, and refresh pushes it back."""
    await store.reserve(call("a"), [acct("acme", 1)], T0, 300, "tok")
    await store.answer("a", T0, 100)
    await store.refresh("a", T0 + 90, 100)
    assert await store.profile_size("account", "acme", T0 + 150) == 1
    assert await store.profile_size("account", "acme", T0 + 190) == 0
    assert (await store.stats(T0 + 190)).expired_dialogs == 1


async def test_sweep_drops_expired_calls(store: CounterStore) -> None:
    """sweep() releases every ended lease and says how many."""
    for cid in ("a", "b", "c"):
        await store.reserve(call(cid), [TOTAL], T0, 10, "tok")
    await store.answer("c", T0, 1000)
    assert sorted(r.call_id for r in await store.sweep(T0 + 11)) == ["a", "b"]
    assert await store.sweep(T0 + 12) == []
    assert await store.profile_size("total", None, T0 + 12) == 1


async def test_profile_list_and_whole_profile(store: CounterStore) -> None:
    """profile_list shows the calls of a value, or of every value when none is given."""
    await store.reserve(call("b", "acme"), [acct("acme")], T0, 300, "tok")
    await store.reserve(call("a", "acme"), [acct("acme")], T0, 300, "tok")
    await store.reserve(call("z", "beta"), [acct("beta")], T0, 300, "tok")
    listed = (await store.profile_list("account", "acme", T0)).items
    assert sorted(c.call_id for c in listed) == ["a", "b"]
    a = next(c for c in listed if c.call_id == "a")
    assert a.from_uri == "sip:a@example.com" and a.account == "acme"
    assert a.profiles == [("account", "acme")]
    assert sorted(c.call_id for c in (await store.profile_list("account", None, T0)).items) == ["a", "b", "z"]
    assert await store.profile_size("account", None, T0) == 3


async def test_stats_counts(store: CounterStore) -> None:
    """processed/failed/expired/active/early follow the calls' lives."""
    await store.reserve(call("a"), [TOTAL], T0, 300, "tok")
    await store.reserve(call("b"), [TOTAL], T0, 300, "tok")
    await store.reserve(call("c"), [TOTAL], T0, 5, "tok")
    await store.answer("a", T0, 1000)
    await store.end("b", T0, "failed")
    s = await store.stats(T0 + 10)
    assert s.to_json() == {"active_dialogs": 1, "early_dialogs": 0, "processed_dialogs": 3,
                           "expired_dialogs": 1, "failed_dialogs": 1}


async def test_concurrent_reserves_never_exceed_the_limit(store: CounterStore) -> None:
    """Hundreds of concurrent reserves for one key admit exactly the limit."""
    plan = [TOTAL, acct("acme", 10)]
    results = await asyncio.gather(*(store.reserve(call(f"c{i}"), plan, T0, 300, "tok") for i in range(300)))
    assert sum(r.admitted for r in results) == 10
    assert await store.profile_size("account", "acme", T0) == 10
    assert await store.profile_size("total", None, T0) == 10
    await asyncio.gather(*(store.end(f"c{i}", T0, "bye") for i in range(300)))
    assert await store.profile_size("total", None, T0) == 0


# -- identity, tokens, force -----------------------------------------------------------------


async def test_identity_is_call_id_and_from_tag(store: CounterStore) -> None:
    """One Call-ID with three From-tags is three calls (a phone reusing a Call-ID cannot pass a
    cap); each is ended on its own."""
    plan = [acct("acme", 2)]
    rs = [await store.reserve(call("x", from_tag=t), plan, T0, 300, f"k{t}") for t in ("1", "2", "3")]
    assert [r.admitted for r in rs] == [True, True, False]
    assert await store.profile_size("account", "acme", T0) == 2
    assert await store.end(call_uid("x", "1"), T0, "bye") is not None
    assert await store.get_call(call_uid("x", "2"), T0) is not None
    assert await store.profile_size("account", "acme", T0) == 1


async def test_repeated_check_takes_the_admission_over(store: CounterStore) -> None:
    """A repeated check of a held call gets the new token; an end with the old one changes
    nothing (it belongs to the earlier attempt), an end with the new one releases."""
    plan = [acct("acme", 3)]
    c = call("a", from_tag="ft")
    assert (await store.reserve(c, plan, T0, 300, "first")).record.token == "first"  # type: ignore[union-attr]
    again = await store.reserve(c, plan, T0 + 1, 300, "second")
    assert again.admitted and again.duplicate and again.sizes == [1]
    assert again.record is not None and again.record.token == "second"
    stale = await store.end(c.uid, T0 + 2, "failed", "first")
    assert stale is not None and stale.token == "second"  # returned, not released
    assert await store.profile_size("account", "acme", T0 + 2) == 1
    stale = await store.answer(c.uid, T0 + 2, 3600, "first")
    assert stale is not None and stale.state == "early"
    assert (await store.answer(c.uid, T0 + 3, 3600, "second")).state == "active"  # type: ignore[union-attr]
    assert (await store.end(c.uid, T0 + 4, "bye", "second")) is not None
    assert await store.get_call(c.uid, T0 + 4) is None


async def test_stale_answer_and_refresh_change_nothing(store: CounterStore) -> None:
    """After a repeated check took the admission over, `answer` and `refresh` with the first token
    (late notices of the earlier attempt) return the held record and change nothing: not its
    state, not its lease, not its token; the holder's own notices still work."""
    plan = [acct("acme", 3)]
    c = call("a", from_tag="ft")
    await store.reserve(c, plan, T0, 300, "first")
    await store.reserve(c, plan, T0 + 1, 300, "second")
    held = await store.get_call(c.uid, T0 + 1)
    assert held is not None and held.token == "second" and held.state == "early"
    before = (held.state, held.timeout, held.expires, held.start_ts, held.token)
    stale = await store.refresh(c.uid, T0 + 2, 3600, "first")
    assert stale is not None and stale.token == "second"
    stale = await store.answer(c.uid, T0 + 3, 7200, "first")
    assert stale is not None and stale.token == "second"
    after = await store.get_call(c.uid, T0 + 3)
    assert after is not None and (after.state, after.timeout, after.expires, after.start_ts, after.token) == before
    # the holder answers; a stale refresh of the active call does not extend its lease either
    ans = await store.answer(c.uid, T0 + 4, 600, "second")
    assert ans is not None and ans.state == "active" and ans.expires == T0 + 4 + 600
    stale = await store.refresh(c.uid, T0 + 5, 3600, "first")
    assert stale is not None and stale.token == "second"
    held = await store.get_call(c.uid, T0 + 5)
    assert held is not None and (held.state, held.timeout, held.expires) == ("active", 600, T0 + 4 + 600)
    assert await store.profile_size("account", "acme", T0 + 5) == 1
    # the lease still ends when the holder's answer said: the stale refresh kept nothing alive
    assert await store.sweep(T0 + 4 + 600 - 1) == []
    assert [r.uid for r in await store.sweep(T0 + 4 + 600 + 1)] == [c.uid]
    assert await store.profile_size("account", "acme", T0 + 700) == 0


async def test_repeated_check_with_other_fields_is_a_conflict(store: CounterStore) -> None:
    """The same identity with another account is refused and changes nothing."""
    c = call("a", from_tag="ft")
    await store.reserve(c, [acct("acme", 3)], T0, 300, "first")
    other = CallInfo("a", c.from_uri, c.to_uri, "beta", "ft")
    r = await store.reserve(other, [acct("beta", 3)], T0, 300, "second")
    assert r.conflict and not r.admitted
    assert r.record is not None and r.record.token == "first" and r.record.account == "acme"
    assert await store.profile_size("account", "beta", T0) == 0


async def test_force_admits_over_the_limit(store: CounterStore) -> None:
    """Reconciliation adds calls the proxy really has, even over a cap."""
    plan = [acct("acme", 1)]
    assert (await store.reserve(call("a"), plan, T0, 300, "t")).admitted
    assert not (await store.reserve(call("b"), plan, T0, 300, "t")).admitted
    r = await store.reserve(call("b"), plan, T0, 300, "t", force=True)
    assert r.admitted and r.sizes == [2]
    assert await store.profile_size("account", "acme", T0) == 2


async def test_record_keeps_tag_node_token_and_vars(store: CounterStore) -> None:
    """What the check said about the call is in its record."""
    c = CallInfo("a", "sip:1@x", "sip:2@x", "acme", "ft", "kam1", {"plan": "gold"})
    await store.reserve(c, [acct("acme", 3)], T0, 300, "tok1")
    rec = await store.get_call(c.uid, T0)
    assert rec is not None
    assert (rec.call_id, rec.from_tag, rec.node, rec.token, rec.vars) == ("a", "ft", "kam1", "tok1", {"plan": "gold"})
    rec = await store.set_var(c.uid, "tier", "2", T0)
    assert rec is not None and rec.vars == {"plan": "gold", "tier": "2"}
    rec = await store.set_var(c.uid, "plan", None, T0)
    assert rec is not None and rec.vars == {"tier": "2"}
    assert (await store.get_call(c.uid, T0)).vars == {"tier": "2"}  # type: ignore[union-attr]
    assert await store.set_var("nope", "x", "1", T0) is None


# -- listings and counters ---------------------------------------------------------------------


async def test_listings_page_without_skipping(store: CounterStore) -> None:
    """Pages of a profile (and of a node) never skip a call that stays, whatever else ends."""
    for i in range(25):
        await store.reserve(call(f"c{i:02d}", node="n1"), [TOTAL, acct("acme")], T0, 300, "t")
    seen: list[str] = []
    cursor = ""
    rounds = 0
    while True:
        page = await store.profile_list("total", None, T0, cursor, 7)
        seen += [r.call_id for r in page.items]
        if rounds == 0:  # calls leave while the listing goes on
            for cid in ("c00", "c20", "c21"):
                await store.end(cid, T0, "bye")
        rounds += 1
        cursor = page.cursor
        if not cursor:
            break
        assert rounds < 20
    stayed = {f"c{i:02d}" for i in range(25)} - {"c00", "c20", "c21"}
    assert stayed <= set(seen)
    node = await store.node_calls("n1", T0, "", 1000)
    assert {r.call_id for r in node.items} == stayed and node.cursor == ""
    assert (await store.node_calls("other", T0)).items == []


async def test_profile_values_and_whole_profile_size(store: CounterStore) -> None:
    """Sizes per value, and a whole profile counts each call once even in two of its values."""
    await store.reserve(call("a"), [acct("acme"), acct("beta")], T0, 300, "t")
    await store.reserve(call("b", "beta"), [acct("beta")], T0, 300, "t")
    values = dict((await store.profile_values("account", T0)).items)
    assert values == {"acme": 1, "beta": 2}
    assert await store.profile_size("account", None, T0) == 2
    await store.end("a", T0, "bye")
    assert dict((await store.profile_values("account", T0)).items) == {"beta": 1}
    assert await store.profile_size("account", None, T0) == 1


async def test_every_expiry_is_reported_once(store: CounterStore) -> None:
    """A call whose lease ended is returned by exactly one sweep, also when an operation
    dropped it lazily first."""
    await store.reserve(call("a"), [acct("acme", 1)], T0, 10, "t")
    await store.reserve(call("b"), [TOTAL], T0, 10, "t")
    assert (await store.reserve(call("c"), [acct("acme", 1)], T0 + 11, 300, "t")).admitted  # drops "a" lazily
    first = await store.sweep(T0 + 12)
    second = await store.sweep(T0 + 13)
    assert sorted(r.call_id for r in first + second) == ["a", "b"]


# -- call rates ----------------------------------------------------------------------------
#
# Rates here refill slowly (one token every 10 s of the test's clock): the Redis buckets expire
# on Redis's own clock once they would be full again (+1 s), which must not happen mid-test.


@pytest.fixture
def rated(store: CounterStore) -> CounterStore:
    """The store, for the call-rate tests: a store without rate support (a future backend) would
    be skipped, and the service refuses rules with rates on it (tests/test_service.py). Every
    backend here takes rates (`test_every_backend_here_takes_rates`): the skip is unreachable."""
    if not store.supports_rates:
        pytest.skip(f"{store.name}: call rates are not supported on this store")
    return store


def test_every_backend_here_takes_rates(store: CounterStore) -> None:
    """Embedded, Redis and Redis Cluster all run the rate tests below (none is skipped)."""
    assert store.supports_rates


def cps(value: str | None = "acme", rate: float = 0.1, burst: int = 3, shadow: bool = False,
        rule: str = "acct-cps") -> RateEntry:
    """A rate entry (default: one call every 10 s, bursts of 3)."""
    return RateEntry(rule, value, rate, burst, shadow)


async def test_rate_admits_a_burst_then_refills_with_the_clock(rated: CounterStore) -> None:
    """A full bucket admits `burst` calls at once; then one call per 1/rate seconds of `now`;
    tokens are reported as they were before the call took one."""
    store = rated
    rates = [cps()]
    got = [await store.reserve(call(f"b{i}"), [TOTAL], T0, 300, "t", rates=rates) for i in range(4)]
    assert [r.admitted for r in got] == [True, True, True, False]
    assert [list(r.tokens) for r in got] == [[3.0], [2.0], [1.0], [0.0]]
    assert [r.rate_blocked for r in got] == [None, None, None, 0]
    refused = got[3]
    assert refused.blocked is None and refused.record is None and refused.sizes == [3]
    assert await store.get_call("b3", T0) is None
    assert await store.profile_size("total", None, T0) == 3  # a refused call joins nothing
    r = await store.reserve(call("c1"), [TOTAL], T0 + 5, 300, "t", rates=rates)
    assert not r.admitted and r.rate_blocked == 0 and list(r.tokens) == [0.5]
    r = await store.reserve(call("c2"), [TOTAL], T0 + 10, 300, "t", rates=rates)
    assert r.admitted and list(r.tokens) == [1.0]
    r = await store.reserve(call("c3"), [TOTAL], T0 + 10, 300, "t", rates=rates)
    assert not r.admitted and list(r.tokens) == [0.0]
    r = await store.reserve(call("c4"), [TOTAL], T0 + 1000, 300, "t", rates=rates)
    assert r.admitted and list(r.tokens) == [3.0]  # refilled up to the burst, not beyond


async def test_rate_never_admits_more_than_rate_times_window_plus_burst(rated: CounterStore) -> None:
    """A check every 0.25 s for 60 s against 0.5 calls/s, bursts of 4: in every window
    [t_i, t_j] of admissions at most 0.5 * (t_j - t_i) + 4 calls, and in all 4 + 0.5 * 60."""
    store = rated
    rates = [cps(rate=0.5, burst=4)]
    admitted: list[float] = []
    for i in range(241):
        now = T0 + i * 0.25
        r = await store.reserve(call(f"w{i}"), [], now, 300, "t", rates=rates)
        if r.admitted:
            admitted.append(now)
    assert len(admitted) == 4 + 30
    for i in range(len(admitted)):
        for j in range(i, len(admitted)):
            assert j - i + 1 <= 0.5 * (admitted[j] - admitted[i]) + 4


async def test_concurrent_reserves_never_exceed_the_burst(rated: CounterStore) -> None:
    """Hundreds of concurrent checks at one instant against a full bucket admit exactly its burst."""
    store = rated
    rates = [cps(burst=7)]
    results = await asyncio.gather(*(store.reserve(call(f"k{i}"), [TOTAL], T0, 300, "t", rates=rates)
                                     for i in range(300)))
    assert sum(r.admitted for r in results) == 7
    assert sum(r.rate_blocked == 0 for r in results) == 293
    assert await store.profile_size("total", None, T0) == 7


async def test_a_call_refused_by_a_limit_takes_no_token(rated: CounterStore) -> None:
    """All or nothing with a concurrency cap: the limit refuses, the rate keeps its token."""
    store = rated
    plan = [acct("acme", 1)]
    rates = [cps(burst=2)]
    assert (await store.reserve(call("a"), plan, T0, 300, "t", rates=rates)).admitted
    for cid in ("b", "c", "d"):
        r = await store.reserve(call(cid), plan, T0, 300, "t", rates=rates)
        assert (r.admitted, r.blocked, r.rate_blocked, list(r.tokens)) == (False, 0, None, [1.0])
    await store.end("a", T0, "bye")
    r = await store.reserve(call("e"), plan, T0, 300, "t", rates=rates)
    assert r.admitted and list(r.tokens) == [1.0]
    await store.end("e", T0, "bye")
    r = await store.reserve(call("f"), plan, T0, 300, "t", rates=rates)
    assert (r.admitted, r.blocked, r.rate_blocked) == (False, None, 0)  # now the rate refuses
    assert await store.profile_size("account", "acme", T0) == 0


async def test_a_call_refused_by_one_rate_takes_no_token_of_another(rated: CounterStore) -> None:
    """Two rates: the second is empty, so the call is refused and the first keeps its tokens;
    both a limit and a rate refusing are both reported."""
    store = rated
    trunk = cps(value=None, burst=1, rule="trunk-cps")
    account = cps(burst=5)
    assert (await store.reserve(call("a"), [], T0, 300, "t", rates=[account, trunk])).admitted
    for cid in ("b", "c"):
        r = await store.reserve(call(cid), [], T0, 300, "t", rates=[account, trunk])
        assert (r.admitted, r.rate_blocked, list(r.tokens)) == (False, 1, [4.0, 0.0])
    r = await store.reserve(call("d"), [acct("acme", 0)], T0, 300, "t", rates=[account, trunk])
    assert (r.admitted, r.blocked, r.rate_blocked) == (False, 0, 1)
    r = await store.reserve(call("e"), [], T0, 300, "t", rates=[account])
    assert r.admitted and list(r.tokens) == [4.0]


async def test_a_repeated_check_takes_no_token(rated: CounterStore) -> None:
    """A duplicate check of a held call is the same call: no bucket is read or drained."""
    store = rated
    rates = [cps(burst=2)]
    assert (await store.reserve(call("a"), [TOTAL], T0, 300, "t1", rates=rates)).admitted
    for tok in ("t2", "t3", "t4"):
        again = await store.reserve(call("a"), [TOTAL], T0, 300, tok, rates=rates)
        assert again.admitted and again.duplicate and list(again.tokens) == [] and again.rate_blocked is None
    r = await store.reserve(call("b"), [TOTAL], T0, 300, "t", rates=rates)
    assert r.admitted and list(r.tokens) == [1.0]


async def test_a_forced_reserve_takes_no_token(rated: CounterStore) -> None:
    """Reconciliation's forced adds are calls that started earlier: no token, even from an empty bucket."""
    store = rated
    rates = [cps(burst=1)]
    for cid in ("f1", "f2"):
        r = await store.reserve(call(cid), [TOTAL], T0, 300, "t", force=True, rates=rates)
        assert r.admitted and list(r.tokens) == []
    r = await store.reserve(call("a"), [TOTAL], T0, 300, "t", rates=rates)
    assert r.admitted and list(r.tokens) == [1.0]
    r = await store.reserve(call("b"), [TOTAL], T0, 300, "t", force=True, rates=rates)
    assert r.admitted  # over an empty bucket too
    assert await store.profile_size("total", None, T0) == 4


async def test_a_shadow_rate_never_refuses_and_reports_would_deny(rated: CounterStore) -> None:
    """A shadow rate takes a token when it has one; without one the call passes, tokens say < 1."""
    store = rated
    rates = [cps(burst=1, shadow=True)]
    a = await store.reserve(call("a"), [TOTAL], T0, 300, "t", rates=rates)
    b = await store.reserve(call("b"), [TOTAL], T0 + 5, 300, "t", rates=rates)
    c = await store.reserve(call("c"), [TOTAL], T0 + 10, 300, "t", rates=rates)
    assert [(r.admitted, r.rate_blocked) for r in (a, b, c)] == [(True, None)] * 3
    assert [list(r.tokens) for r in (a, b, c)] == [[1.0], [0.5], [1.0]]  # b took none: c finds a full one


async def test_buckets_are_per_rule_and_value(rated: CounterStore) -> None:
    """Each (rule, value) has its own bucket; a rate without value is one bucket for the rule."""
    store = rated
    for value in ("acme", "beta"):
        assert (await store.reserve(call(f"{value}1"), [], T0, 300, "t", rates=[cps(value, burst=1)])).admitted
        assert not (await store.reserve(call(f"{value}2"), [], T0, 300, "t", rates=[cps(value, burst=1)])).admitted
    other = cps("acme", burst=1, rule="other-rule")
    assert (await store.reserve(call("o1"), [], T0, 300, "t", rates=[other])).admitted
    whole = cps(None, burst=1, rule="acme")  # no value: not the bucket of value "acme" of a rule
    assert (await store.reserve(call("n1"), [], T0, 300, "t", rates=[whole])).admitted
    assert not (await store.reserve(call("n2"), [], T0, 300, "t", rates=[whole])).admitted


async def test_a_clock_behind_the_bucket_mints_no_tokens(rated: CounterStore) -> None:
    """An instance whose clock is behind the bucket's time refills nothing, and does not move
    the bucket's time back (which would refill the same seconds twice)."""
    store = rated
    rates = [cps(burst=1)]
    assert (await store.reserve(call("a"), [], T0 + 10, 300, "t", rates=rates)).admitted
    r = await store.reserve(call("b"), [], T0 + 2, 300, "t", rates=rates)
    assert not r.admitted and list(r.tokens) == [0.0]
    r = await store.reserve(call("c"), [], T0 + 15, 300, "t", rates=rates)
    assert not r.admitted and list(r.tokens) == [0.5]  # refilled from T0 + 10, not from T0 + 2
    assert (await store.reserve(call("d"), [], T0 + 20, 300, "t", rates=rates)).admitted
