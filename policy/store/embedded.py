"""The embedded (in-process) counter store, with snapshots for restarts.

Everything runs on the event loop thread and no method awaits before it has finished its
work, so each operation is atomic by construction. Expiry is lazy (every operation first
drops the leases that ended) plus a periodic sweep, so counts are right without timers.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import orjson
import structlog

from policy.errors import SnapshotError
from policy.store.base import (
    FAILED_REASONS,
    CallInfo,
    CallRecord,
    CounterStore,
    DialogStats,
    PlanEntry,
    ReserveResult,
)

log = structlog.get_logger("policy.store.embedded")

ProfileKey = tuple[str, str | None]
SNAPSHOT_VERSION = 1


class EmbeddedStore(CounterStore):
    """Profile counters in this process's memory."""

    name = "embedded"
    answers_inline = True

    def __init__(
        self,
        *,
        snapshot_path: str | os.PathLike[str] | None = None,
        snapshot_interval: float = 10.0,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self._calls: dict[str, CallRecord] = {}
        # (profile, value) -> ordered set of call ids; profile -> its values with members
        self._keys: dict[ProfileKey, dict[str, None]] = {}
        self._values: dict[str, set[str | None]] = {}
        self._heap: list[tuple[float, str]] = []
        self._processed = 0
        self._expired = 0
        self._failed = 0
        self._snapshot_path = Path(snapshot_path) if snapshot_path else None
        self._snapshot_interval = snapshot_interval
        self._clock = clock
        self._task: asyncio.Task[None] | None = None
        self._dirty = False

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Restore the snapshot (if any) and start the periodic snapshot task."""
        if self._snapshot_path is not None:
            now = self._clock() if self._clock else _time()
            self.restore(self._snapshot_path, now)
            if self._snapshot_interval > 0:
                self._task = asyncio.get_running_loop().create_task(self._snapshot_loop())

    async def close(self) -> None:
        """Stop the snapshot task and write a final snapshot."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._snapshot_path is not None:
            self.write_snapshot(self._snapshot_path)

    async def _snapshot_loop(self) -> None:
        assert self._snapshot_path is not None
        while True:
            await asyncio.sleep(self._snapshot_interval)
            if self._dirty:
                try:
                    self.write_snapshot(self._snapshot_path)
                except OSError as exc:
                    log.error("snapshot_write_failed", path=str(self._snapshot_path), error=str(exc))

    # -- internals ---------------------------------------------------------------------

    def _purge(self, now: float) -> int:
        heap = self._heap
        dropped = 0
        while heap and heap[0][0] <= now:
            expires, call_id = heapq.heappop(heap)
            rec = self._calls.get(call_id)
            if rec is not None and rec.expires == expires:
                self._remove(rec)
                self._expired += 1
                dropped += 1
        return dropped

    def _remove(self, rec: CallRecord) -> None:
        del self._calls[rec.call_id]
        keys = self._keys
        for key in rec.profiles:
            members = keys.get(key)
            if members is None:
                continue
            members.pop(rec.call_id, None)
            if not members:
                del keys[key]
                values = self._values[key[0]]
                values.discard(key[1])
                if not values:
                    del self._values[key[0]]
        self._dirty = True

    def _size(self, key: ProfileKey) -> int:
        members = self._keys.get(key)
        return 0 if members is None else len(members)

    def _lease(self, rec: CallRecord, now: float, timeout: float) -> None:
        rec.timeout = timeout
        rec.expires = now + timeout
        heapq.heappush(self._heap, (rec.expires, rec.call_id))
        self._dirty = True

    def _add(self, rec: CallRecord) -> None:
        self._calls[rec.call_id] = rec
        keys = self._keys
        cid = rec.call_id
        for key in rec.profiles:
            members = keys.get(key)
            if members is None:
                keys[key] = {cid: None}
                self._values.setdefault(key[0], set()).add(key[1])
            else:
                members[cid] = None
        heapq.heappush(self._heap, (rec.expires, rec.call_id))
        self._dirty = True

    # -- operations --------------------------------------------------------------------

    async def reserve(
        self, call: CallInfo, plan: Sequence[PlanEntry], now: float, timeout: float
    ) -> ReserveResult:
        """Admit the call into every key of the plan, or into none."""
        if self._heap and self._heap[0][0] <= now:
            self._purge(now)
        held = self._calls.get(call.call_id)
        if held is not None:
            return ReserveResult(True, True, None, [self._size(e.key) for e in plan], held)
        index = self._keys
        sizes: list[int] = []
        joined: list[ProfileKey] = []
        blocked = None
        for i, (profile, value, limit, shadow, _rule) in enumerate(plan):
            key = (profile, value)
            members = index.get(key)
            n = len(members) if members else 0
            sizes.append(n)
            joined.append(key)
            if limit is not None and n >= limit and not shadow and blocked is None:
                blocked = i
        if blocked is not None:
            return ReserveResult(False, False, blocked, sizes, None)
        keys = list(dict.fromkeys(joined))
        rec = CallRecord(call.call_id, call.from_uri, call.to_uri, call.account, "early", now, None,
                         timeout, now + timeout, keys)
        self._add(rec)
        self._processed += 1
        if len(keys) != len(plan):  # a key listed twice: count the call once
            return ReserveResult(True, False, None, [self._size(e.key) for e in plan], rec)
        return ReserveResult(True, False, None, [n + 1 for n in sizes], rec)

    async def answer(self, call_id: str, now: float, timeout: float) -> CallRecord | None:
        """Mark a held call answered and give it the answered-call lease."""
        self._purge(now)
        rec = self._calls.get(call_id)
        if rec is None:
            return None
        if rec.state != "active":
            rec.state = "active"
            rec.start_ts = now
        self._lease(rec, now, timeout)
        return rec

    async def refresh(self, call_id: str, now: float, timeout: float) -> CallRecord | None:
        """Extend a held call's lease."""
        self._purge(now)
        rec = self._calls.get(call_id)
        if rec is None:
            return None
        self._lease(rec, now, timeout)
        return rec

    async def end(self, call_id: str, now: float, reason: str) -> CallRecord | None:
        """Release a held call."""
        self._purge(now)
        rec = self._calls.get(call_id)
        if rec is None:
            return None
        self._remove(rec)
        if reason in FAILED_REASONS:
            self._failed += 1
        elif reason == "timeout":
            self._expired += 1
        return rec

    async def get_call(self, call_id: str, now: float) -> CallRecord | None:
        """The record of a held call."""
        self._purge(now)
        return self._calls.get(call_id)

    def _members(self, profile: str, value: str | None) -> list[str]:
        if value is not None:
            return list(self._keys.get((profile, value), ()))
        values = self._values.get(profile, ())
        return list(dict.fromkeys(cid for v in values for cid in self._keys[(profile, v)]))

    async def profile_size(self, profile: str, value: str | None, now: float) -> int:
        """How many calls are in the key (or the whole profile)."""
        self._purge(now)
        if value is not None:
            return self._size((profile, value))
        return len(self._members(profile, None))

    async def profile_list(self, profile: str, value: str | None, now: float) -> list[CallRecord]:
        """The calls in the key (or the whole profile)."""
        self._purge(now)
        return [self._calls[cid] for cid in sorted(self._members(profile, value))]

    async def stats(self, now: float) -> DialogStats:
        """Dialog statistics of this process."""
        self._purge(now)
        active = sum(1 for r in self._calls.values() if r.state == "active")
        return DialogStats(
            active_dialogs=active,
            early_dialogs=len(self._calls) - active,
            processed_dialogs=self._processed,
            expired_dialogs=self._expired,
            failed_dialogs=self._failed,
        )

    async def sweep(self, now: float) -> int:
        """Drop ended leases and compact the expiry heap."""
        dropped = self._purge(now)
        if len(self._heap) > 2 * len(self._calls) + 1024:
            self._heap = [(r.expires, r.call_id) for r in self._calls.values()]
            heapq.heapify(self._heap)
        return dropped

    # -- snapshots -----------------------------------------------------------------------

    def dump(self) -> dict[str, Any]:
        """Everything needed to restore the held calls and counters."""
        return {
            "version": SNAPSHOT_VERSION,
            "stats": {
                "processed_dialogs": self._processed,
                "expired_dialogs": self._expired,
                "failed_dialogs": self._failed,
            },
            "calls": [r.to_json() for r in self._calls.values()],
        }

    def load(self, data: Any, now: float) -> tuple[int, int]:
        """Replace the state with a dump; drop calls whose lease ended. Returns (kept, dropped)."""
        if not isinstance(data, dict) or data.get("version") != SNAPSHOT_VERSION:
            raise SnapshotError(f"unsupported snapshot (version {data.get('version')!r})"
                                if isinstance(data, dict) else "snapshot is not a JSON object")
        try:
            records = [CallRecord.from_json(c) for c in data["calls"]]
            stats = data["stats"]
            processed = int(stats["processed_dialogs"])
            expired = int(stats["expired_dialogs"])
            failed = int(stats["failed_dialogs"])
        except (KeyError, TypeError, ValueError) as exc:
            raise SnapshotError(f"malformed snapshot: {exc!r}") from exc
        self._calls.clear()
        self._keys.clear()
        self._values.clear()
        self._heap.clear()
        kept = dropped = 0
        for rec in records:
            if rec.expires <= now:
                dropped += 1
                continue
            self._add(rec)
            kept += 1
        self._processed, self._expired, self._failed = processed, expired + dropped, failed
        return kept, dropped

    def write_snapshot(self, path: Path) -> None:
        """Write the state atomically (temp file, fsync, rename)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as fh:
            fh.write(orjson.dumps(self.dump()))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        self._dirty = False
        log.debug("snapshot_written", path=str(path), calls=len(self._calls))

    def restore(self, path: Path, now: float) -> None:
        """Load a snapshot if there is one; set a bad one aside and start empty."""
        if not path.exists():
            log.info("snapshot_absent", path=str(path))
            return
        try:
            data = orjson.loads(path.read_bytes())
            kept, dropped = self.load(data, now)
        except (OSError, orjson.JSONDecodeError, SnapshotError) as exc:
            aside = path.with_name(f"{path.name}.corrupt-{int(now)}")
            with contextlib.suppress(OSError):
                os.replace(path, aside)
            log.error("snapshot_unreadable", path=str(path), moved_to=str(aside), error=str(exc))
            return
        log.info("snapshot_restored", path=str(path), calls=kept, expired=dropped)


def _time() -> float:
    import time

    return time.time()
