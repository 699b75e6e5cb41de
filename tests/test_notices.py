"""Notices the store refused (answer/refresh/end) are kept and applied later, in order."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

from policy.clock import ManualClock
from policy.errors import StoreError
from policy.notices import Notice, NoticeQueue
from policy.service import PolicyService
from policy.store.base import CallInfo, CallRecord, PlanEntry
from policy.store.embedded import EmbeddedStore

ROOT = Path(__file__).resolve().parent.parent
T0 = 1_800_000_000.0
PLAN = [PlanEntry("account", "acme", 3, False, "account-cap")]


class FlakyStore(EmbeddedStore):
    """An embedded store that refuses answer/refresh/end while `down` (a Redis outage stand-in)."""

    def __init__(self) -> None:
        super().__init__()
        self.down = False
        self.refused = 0

    def _gate(self) -> None:
        if self.down:
            self.refused += 1
            raise StoreError("store down")

    async def answer(self, *a: Any, **k: Any) -> Any:
        self._gate()
        return await super().answer(*a, **k)

    async def refresh(self, *a: Any, **k: Any) -> Any:
        self._gate()
        return await super().refresh(*a, **k)

    async def end(self, *a: Any, **k: Any) -> Any:
        self._gate()
        return await super().end(*a, **k)


async def test_queued_notices_apply_in_order_once_the_store_is_back() -> None:
    """answer then end, both refused: once the store answers, the call ends up released (not
    left active by an answer applied after its end), and the end is reported once."""
    store = FlakyStore()
    clock = ManualClock(T0)
    ended: list[tuple[str, str]] = []
    q = NoticeQueue(store, clock.now, on_end=lambda rec, reason, now: ended.append((rec.call_id, reason)))
    await store.reserve(CallInfo("a", account="acme"), PLAN, T0, 300, "tok")
    store.down = True
    q.add(Notice("answer", "a", "tok", 3600, "", T0))
    q.add(Notice("end", "a", "tok", 0, "bye", T0 + 1))
    assert not await q.drain()  # still down: nothing lost
    assert len(q) == 2
    store.down = False
    assert await q.drain()
    assert await store.get_call("a", T0) is None
    assert await store.profile_size("account", "acme", T0) == 0
    assert ended == [("a", "bye")]
    assert q.info() | {"retried": 0} == {"pending": 0, "queued": 2, "retried": 0, "applied_late": 2,
                                         "dropped": 0, "gave_up": 0}


async def test_a_stale_late_end_releases_nothing() -> None:
    """A late end carrying the token of an earlier attempt leaves the later admission alone."""
    store = FlakyStore()
    q = NoticeQueue(store, ManualClock(T0).now)
    c = CallInfo("a", account="acme", from_tag="ft")
    await store.reserve(c, PLAN, T0, 300, "first")
    store.down = True
    q.add(Notice("end", c.uid, "first", 0, "failed", T0))
    store.down = False
    await store.reserve(c, PLAN, T0 + 1, 300, "second")  # the re-sent INVITE
    assert await q.drain()
    rec = await store.get_call(c.uid, T0 + 2)
    assert rec is not None and rec.token == "second"


async def test_the_queue_is_bounded_and_old_notices_are_given_up() -> None:
    """Past max_items a notice is dropped and counted; one older than max_age is given up."""
    store = FlakyStore()
    clock = ManualClock(T0)
    q = NoticeQueue(store, clock.now, max_items=3, max_age=100)
    assert all(q.add(Notice("end", f"c{i}", None, 0, "bye", T0)) for i in range(3))
    assert not q.add(Notice("end", "c3", None, 0, "bye", T0))
    clock.advance(101)
    assert await q.drain()
    assert q.info()["dropped"] == 1 and q.info()["gave_up"] == 3 and len(q) == 0


async def test_the_service_queues_and_applies_late(tmp_path: Path) -> None:
    """Through the service: an end refused by the store answers `queued` and the queue's task
    applies it when the store is back; the call-end listeners hear of it."""
    store = FlakyStore()
    svc = PolicyService(ROOT / "rules", store, clock=ManualClock(T0))
    heard: list[CallRecord] = []
    svc.on_call_end.append(lambda rec, reason, now: heard.append(rec))
    r = await svc.handle({"op": "check", "call_id": "x", "from": "sip:1@a", "to": "sip:2@a", "account": "acme"})
    assert r["decision"] == "allow"
    store.down = True
    r = await svc.handle({"op": "end", "call_id": "x", "token": r["token"]})
    assert r == {"ok": True, "queued": True}
    task = asyncio.create_task(svc.notices.run())
    try:
        await asyncio.sleep(0.2)
        assert len(svc.notices) == 1 and store.refused >= 2  # retried with backoff meanwhile
        store.down = False
        for _ in range(100):
            if not len(svc.notices):
                break
            await asyncio.sleep(0.05)
        assert len(svc.notices) == 0
        assert await store.profile_size("account", "acme", T0) == 0
        assert [rec.call_id for rec in heard] == ["x"]
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
