"""Notices that must eventually apply: answer, refresh and end that the store refused.

A proxy sends `answer`/`refresh`/`end` and usually waits for nothing (Kamailio's dialog
events get no reply). When the store cannot take one (Redis down or slow), dropping it
would hold a slot for a call that is gone (a lost `end`) or release a call that is up (a
lost `answer` leaves it `early`). So the service keeps it here, in arrival order, and a
background task applies it once the store answers again, with jittered backoff, until it
applies or the lease it concerns must have ended anyway (`max_age`). The queue is bounded:
past `max_items` a notice is dropped, logged with its call and counted. Counters: queued,
retried, applied_late, dropped (the bound), gave_up (too old), pending.

The queue lives in the service process: a service restart loses what was still queued,
which the reconciliation with the proxies repairs (docs: "Decision semantics").
"""

from __future__ import annotations

import asyncio
import collections
import random
from collections.abc import Callable
from typing import Any, NamedTuple

import structlog

from policy.errors import StoreError
from policy.store.base import CallRecord, CounterStore

log = structlog.get_logger("policy.notices")

INITIAL_BACKOFF = 0.05
MAX_BACKOFF = 2.0
BATCH = 256


class Notice(NamedTuple):
    """One queued notice, with the time it arrived (its lease is counted from then)."""

    kind: str  # "answer", "refresh" or "end"
    uid: str
    token: str | None
    timeout: float  # answer/refresh: the lease length
    reason: str  # end: why
    received: float  # clock time it arrived


class NoticeQueue:
    """Bounded FIFO of notices the store refused, applied again in order."""

    def __init__(self, store: CounterStore, now: Callable[[], float], *, max_items: int = 100_000,
                 max_age: float = 43200.0, on_end: Callable[[CallRecord, str, float], None] | None = None) -> None:
        self.store = store
        self.on_end = on_end  # told of every call a late `end` released (call records, logs)
        self.now = now
        self.max_items = max_items
        self.max_age = max_age
        self.queue: collections.deque[Notice] = collections.deque()
        self.queued = 0
        self.retried = 0
        self.applied_late = 0
        self.dropped = 0
        self.gave_up = 0
        self._wake = asyncio.Event()

    def __len__(self) -> int:
        return len(self.queue)

    def add(self, notice: Notice) -> bool:
        """Queue a notice the store refused; False (dropped, logged) when the queue is full."""
        if len(self.queue) >= self.max_items:
            self.dropped += 1
            log.error("notice_dropped", kind=notice.kind, call=notice.uid, reason="queue full",
                      limit=self.max_items)
            return False
        self.queue.append(notice)
        self.queued += 1
        self._wake.set()
        return True

    def info(self) -> dict[str, Any]:
        """Counters for stats and metrics."""
        return {"pending": len(self.queue), "queued": self.queued, "retried": self.retried,
                "applied_late": self.applied_late, "dropped": self.dropped, "gave_up": self.gave_up}

    async def apply(self, n: Notice) -> None:
        """Apply one notice now (raises StoreError)."""
        store = self.store
        if n.kind == "end":
            now = self.now()
            rec = await store.end(n.uid, now, n.reason, n.token)
            if rec is not None and (not n.token or rec.token == n.token) and self.on_end is not None:
                self.on_end(rec, n.reason, now)
        elif n.kind == "answer":
            await store.answer(n.uid, n.received, n.timeout, n.token)
        else:
            await store.refresh(n.uid, n.received, n.timeout, n.token)

    async def drain(self) -> bool:
        """Apply queued notices in order until the queue is empty (True) or the store fails (False)."""
        while self.queue:
            batch = [self.queue[i] for i in range(min(BATCH, len(self.queue)))]
            now = self.now()
            fresh = []
            for n in batch:
                if now - n.received > self.max_age:
                    self.gave_up += 1
                    log.warning("notice_gave_up", kind=n.kind, call=n.uid, age=round(now - n.received, 1))
                else:
                    fresh.append(n)
            self.retried += len(fresh)
            results = await asyncio.gather(*(self.apply(n) for n in fresh), return_exceptions=True)
            done = len(batch)
            for i, r in enumerate(results):
                if isinstance(r, StoreError):
                    done = batch.index(fresh[i])  # keep this one and everything after it, in order
                    break
                if isinstance(r, BaseException):
                    log.error("notice_failed", kind=fresh[i].kind, call=fresh[i].uid, error=repr(r))
                else:
                    self.applied_late += 1
                    log.info("notice_applied_late", kind=fresh[i].kind, call=fresh[i].uid)
            for _ in range(done):
                self.queue.popleft()
            if done < len(batch):
                return False
        return True

    async def run(self) -> None:
        """Apply what is queued whenever there is something, backing off while the store fails."""
        backoff = INITIAL_BACKOFF
        while True:
            if not self.queue:
                self._wake.clear()
                await self._wake.wait()
            if await self.drain():
                backoff = INITIAL_BACKOFF
                continue
            await asyncio.sleep(backoff * (0.5 + random.random()))
            backoff = min(backoff * 2, MAX_BACKOFF)
