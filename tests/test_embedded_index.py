"""The embedded store's indexes: the lease wheel (expiry stays exact, an end leaves nothing
behind, no sweep walks the held calls) and the whole-profile index (a profile used without
value is its one key; one used both ways, after a rules change, still lists and counts every
call once, oldest first)."""

from __future__ import annotations

import time
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policy.store.base import CallInfo, PlanEntry
from policy.store.embedded import EmbeddedStore

T0 = 1_800_000_000.0
PLAN = [PlanEntry("total", None, None, False, "count"), PlanEntry("user", "u", None, False, "count")]

_op = st.one_of(
    st.tuples(st.just("reserve"), st.integers(0, 7), st.floats(0.001, 5.0)),
    st.tuples(st.just("answer"), st.integers(0, 7), st.floats(0.001, 5.0)),
    st.tuples(st.just("refresh"), st.integers(0, 7), st.floats(0.001, 5.0)),
    st.tuples(st.just("end"), st.integers(0, 7), st.just(0.0)),
    st.tuples(st.just("advance"), st.just(0), st.floats(0.0, 3.0)),
    st.tuples(st.just("back"), st.just(0), st.floats(0.0, 3.0)),  # the clock steps back
    st.tuples(st.just("sweep"), st.just(0), st.just(0.0)),
)


def _run(coro: Any) -> Any:
    try:
        coro.send(None)
    except StopIteration as stop:
        return stop.value
    raise AssertionError("the embedded store suspended")


@settings(max_examples=300, deadline=None)
@given(st.lists(_op, max_size=60))
def test_expiry_is_exact_whatever_the_order(ops: list[tuple[str, int, float]]) -> None:
    """Against a model (uid -> expires; a lease that ended by `now` is gone before any
    operation): the same calls are held after every step, sizes agree, and every expiry is
    reported by exactly one sweep - across bucket boundaries, re-leases and a clock that steps back."""
    store = EmbeddedStore()
    model: dict[str, float] = {}
    expired: list[str] = []
    now = T0 + 0.5

    def purge() -> None:
        for uid in [u for u, exp in model.items() if exp <= now]:
            del model[uid]
            expired.append(uid)

    for kind, i, x in ops:
        uid = f"c{i}"
        if kind == "advance":
            now += x
            continue
        if kind == "back":
            now -= x
            continue
        purge()
        if kind == "reserve":
            res = _run(store.reserve(CallInfo(uid), PLAN, now, x, "t"))
            assert res.admitted and res.duplicate == (uid in model)
            model.setdefault(uid, now + x)
        elif kind in ("answer", "refresh"):
            rec = _run(getattr(store, kind)(uid, now, x))
            assert (rec is not None) == (uid in model)
            if uid in model:
                model[uid] = now + x
        elif kind == "end":
            rec = _run(store.end(uid, now, "bye"))
            assert (rec is not None) == (uid in model)
            model.pop(uid, None)
        else:
            got = _run(store.sweep(now))
            assert sorted(r.uid for r in got) == sorted(expired)
            expired.clear()
        assert sorted(store._calls) == sorted(model)
        assert _run(store.profile_size("total", None, now)) == len(model)
        assert _run(store.profile_size("user", "u", now)) == len(model)


async def test_an_end_leaves_nothing_behind() -> None:
    """10,000 checks and ends leave no lease entry anywhere (the old expiry heap kept one per
    call until its lease time, and had to be rebuilt from every held call)."""
    store = EmbeddedStore()
    for i in range(10_000):
        await store.reserve(CallInfo(f"c{i}"), PLAN, T0 + i * 0.001, 300.0, "t")
        await store.end(f"c{i}", T0 + i * 0.001, "bye")
    assert not store._calls and not store._due
    assert sum(len(b) for b in store._wheel.values()) == 0
    assert len(store._slots) <= 12  # one per second of expiry used, whatever the number of calls


@pytest.mark.parametrize("held", [0, 100_000])
async def test_sweep_never_walks_the_held_calls(held: int) -> None:
    """With 100k calls held and 150k short calls through (enough that the old expiry heap was
    rebuilt from every held call in a sweep, ~25 ms of CPU), no sweep costs more than a few ms of
    CPU. (A check+end can still meet CPython resizing one of the big index dicts, ~1 ms per 100k
    entries: printed, not bounded here.)"""
    store = EmbeddedStore()
    for i in range(held):
        await store.reserve(CallInfo(f"h{i}"), PLAN[:1], T0, 43200.0, "t")
        await store.answer(f"h{i}", T0, 43200.0)
    worst_sweep = worst_pair = 0.0
    now = T0
    for i in range(150_000):
        now += 0.0001
        t = time.process_time()
        await store.reserve(CallInfo(f"c{i}"), PLAN, now, 300.0, "t")
        await store.end(f"c{i}", now, "bye")
        worst_pair = max(worst_pair, time.process_time() - t)
        if i % 5_000 == 0:
            t = time.process_time()
            await store.sweep(now)
            worst_sweep = max(worst_sweep, time.process_time() - t)
    assert len(store._calls) == held
    print(f"held {held}: worst sweep {worst_sweep * 1000:.2f} ms, worst check+end {worst_pair * 1000:.2f} ms CPU")
    assert worst_sweep < 0.005, worst_sweep


_plans = st.sampled_from([
    [PlanEntry("p", None)], [PlanEntry("p", "a")], [PlanEntry("p", "b")],
    [PlanEntry("p", None), PlanEntry("p", "a")], [PlanEntry("p", "a"), PlanEntry("p", None)],
    [PlanEntry("p", "a"), PlanEntry("p", "b")], [PlanEntry("q", None)], [PlanEntry("p", None), PlanEntry("q", None)],
])


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.tuples(st.just("reserve"), st.integers(0, 9), _plans),
                          st.tuples(st.just("end"), st.integers(0, 9), st.just([]))), max_size=40),
       st.integers(1, 4))
def test_whole_profile_size_and_listing_mixed_or_not(ops: list[tuple[str, int, list[PlanEntry]]],
                                                     page: int) -> None:
    """Whatever mix of valued and no-value keys of one profile the calls joined: the whole
    profile's size is the number of calls in any of its keys, and paging through it lists each
    of them once, in admission order."""
    store = EmbeddedStore()
    held: dict[str, set[str]] = {}  # uid -> profiles it joined, in admission order (dicts keep it)
    for kind, i, plan in ops:
        uid = f"c{i}"
        if kind == "reserve":
            res = _run(store.reserve(CallInfo(uid), plan, T0, 60.0, "t"))
            if not res.duplicate:
                held[uid] = {e.profile for e in plan}
        else:
            _run(store.end(uid, T0, "bye"))
            held.pop(uid, None)
        for profile in ("p", "q"):
            want = [u for u, ps in held.items() if profile in ps]
            assert _run(store.profile_size(profile, None, T0)) == len(want)
            got: list[str] = []
            cursor = ""
            while True:
                pg = _run(store.profile_list(profile, None, T0, cursor, page))
                got += [r.uid for r in pg.items]
                if not pg.cursor:
                    break
                cursor = pg.cursor
            assert got == want
