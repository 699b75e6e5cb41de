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

from policy.errors import SnapshotError, StoreError
from policy.store.base import (
    FAILED_REASONS,
    MAX_PAGE,
    CallInfo,
    CallRecord,
    CounterStore,
    DialogStats,
    Page,
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
        self._calls: dict[str, CallRecord] = {}  # uid -> record
        # indexes, each member -> the sequence number it was indexed under (see _page):
        self._keys: dict[ProfileKey, dict[str, int]] = {}  # (profile, value) -> calls
        self._profiles: dict[str, dict[str, int]] = {}  # profile -> calls in any of its keys
        self._values: dict[str, dict[str, int]] = {}  # profile -> its non-empty values
        self._nodes: dict[str, dict[str, int]] = {}  # node -> calls it admitted
        self._seq = 0
        self._active = 0
        self._expired_pending: list[CallRecord] = []
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
    #
    # Every index maps a call's uid to the sequence number it was indexed under; dicts keep
    # insertion order, so the numbers rise along each index and a listing's cursor is the
    # last number it returned: pages never skip a call that stays, whatever else leaves.

    def _purge(self, now: float) -> int:
        heap = self._heap
        dropped = 0
        while heap and heap[0][0] <= now:
            expires, uid = heapq.heappop(heap)
            rec = self._calls.get(uid)
            if rec is not None and rec.expires == expires:
                self._remove(rec)
                self._expired += 1
                self._expired_pending.append(rec)
                dropped += 1
        return dropped

    @staticmethod
    def _unindex(index: dict[Any, dict[str, int]], key: Any, uid: str) -> bool:
        """Drop uid from index[key]; True when that emptied the key."""
        members = index.get(key)
        if members is None:
            return False
        members.pop(uid, None)
        if not members:
            del index[key]
            return True
        return False

    def _remove(self, rec: CallRecord) -> None:
        uid = rec.uid
        del self._calls[uid]
        for key in rec.profiles:
            if self._unindex(self._keys, key, uid) and key[1] is not None:
                self._unindex(self._values, key[0], key[1])
        for profile in {p for p, _ in rec.profiles}:
            self._unindex(self._profiles, profile, uid)
        self._unindex(self._nodes, rec.node, uid)
        if rec.state == "active":
            self._active -= 1
        self._dirty = True

    def _size(self, key: ProfileKey) -> int:
        members = self._keys.get(key)
        return 0 if members is None else len(members)

    def _lease(self, rec: CallRecord, now: float, timeout: float) -> None:
        rec.timeout = timeout
        rec.expires = now + timeout
        heapq.heappush(self._heap, (rec.expires, rec.uid))
        self._dirty = True

    def _add(self, rec: CallRecord) -> None:
        uid = rec.uid
        self._calls[uid] = rec
        self._seq += 1
        seq = self._seq
        keys = self._keys
        for key in rec.profiles:
            members = keys.get(key)
            if members is None:
                keys[key] = {uid: seq}
                if key[1] is not None:
                    self._values.setdefault(key[0], {})[key[1]] = seq
            else:
                members[uid] = seq
        for profile in {p for p, _ in rec.profiles}:
            self._profiles.setdefault(profile, {})[uid] = seq
        self._nodes.setdefault(rec.node, {})[uid] = seq
        if rec.state == "active":
            self._active += 1
        heapq.heappush(self._heap, (rec.expires, uid))
        self._dirty = True

    def _token_ok(self, rec: CallRecord, token: str | None) -> bool:
        return not token or rec.token == token

    # -- operations --------------------------------------------------------------------

    async def reserve(
        self, call: CallInfo, plan: Sequence[PlanEntry], now: float, timeout: float, token: str,
        force: bool = False,
    ) -> ReserveResult:
        """Admit the call into every key of the plan, or into none."""
        if self._heap and self._heap[0][0] <= now:
            self._purge(now)
        uid = call.uid
        held = self._calls.get(uid)
        if held is not None:
            current = [self._size(e.key) for e in plan]
            if not held.same_call(call):
                return ReserveResult(False, False, None, current, held, True)
            held.token = token  # a later attempt takes the admission over
            self._dirty = True
            return ReserveResult(True, True, None, current, held)
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
            if limit is not None and n >= limit and not shadow and blocked is None and not force:
                blocked = i
        if blocked is not None:
            return ReserveResult(False, False, blocked, sizes, None)
        keys = list(dict.fromkeys(joined))
        rec = CallRecord(call.call_id, call.from_uri, call.to_uri, call.account, "early", now, None,
                         timeout, now + timeout, keys, call.from_tag, call.node, token,
                         dict(call.vars) if call.vars else {})
        self._add(rec)
        self._processed += 1
        if len(keys) != len(plan):  # a key listed twice: count the call once
            return ReserveResult(True, False, None, [self._size(e.key) for e in plan], rec)
        return ReserveResult(True, False, None, [n + 1 for n in sizes], rec)

    async def answer(self, uid: str, now: float, timeout: float, token: str | None = None) -> CallRecord | None:
        """Mark a held call answered and give it the answered-call lease."""
        self._purge(now)
        rec = self._calls.get(uid)
        if rec is None or not self._token_ok(rec, token):
            return rec
        if rec.state != "active":
            rec.state = "active"
            rec.start_ts = now
            self._active += 1
        self._lease(rec, now, timeout)
        return rec

    async def refresh(self, uid: str, now: float, timeout: float, token: str | None = None) -> CallRecord | None:
        """Extend a held call's lease."""
        self._purge(now)
        rec = self._calls.get(uid)
        if rec is None or not self._token_ok(rec, token):
            return rec
        self._lease(rec, now, timeout)
        return rec

    async def end(self, uid: str, now: float, reason: str, token: str | None = None) -> CallRecord | None:
        """Release a held call."""
        self._purge(now)
        rec = self._calls.get(uid)
        if rec is None or not self._token_ok(rec, token):
            return rec
        self._remove(rec)
        if reason in FAILED_REASONS:
            self._failed += 1
        elif reason == "timeout":
            self._expired += 1
        return rec

    async def set_var(self, uid: str, name: str, value: str | None, now: float) -> CallRecord | None:
        """Set or delete one of a held call's variables."""
        self._purge(now)
        rec = self._calls.get(uid)
        if rec is None:
            return None
        if value is None:
            rec.vars.pop(name, None)
        else:
            rec.vars[name] = value
        self._dirty = True
        return rec

    async def get_call(self, uid: str, now: float) -> CallRecord | None:
        """The record of a held call."""
        self._purge(now)
        return self._calls.get(uid)

    @staticmethod
    def _page(members: dict[Any, int] | None, cursor: str, limit: int) -> tuple[list[Any], str]:
        """Up to `limit` members indexed after the cursor, and the cursor of the next page."""
        if not members:
            return [], ""
        try:
            after = int(cursor) if cursor else 0
        except ValueError:
            raise StoreError(f"bad cursor {cursor!r}") from None
        limit = max(1, min(limit, MAX_PAGE))
        out: list[Any] = []
        last = 0
        for member, seq in members.items():
            if seq > after:
                out.append(member)
                last = seq
                if len(out) >= limit:
                    break
        more = bool(out) and len(out) >= limit and next(reversed(members.values())) > last
        return out, str(last) if more else ""

    async def profile_size(self, profile: str, value: str | None, now: float) -> int:
        """How many calls are in the key (or the whole profile)."""
        self._purge(now)
        if value is not None:
            return self._size((profile, value))
        members = self._profiles.get(profile)
        return 0 if members is None else len(members)

    async def profile_list(self, profile: str, value: str | None, now: float,
                           cursor: str = "", limit: int = MAX_PAGE) -> Page:
        """A page of the calls in the key (or the whole profile), oldest first."""
        self._purge(now)
        members = self._keys.get((profile, value)) if value is not None else self._profiles.get(profile)
        uids, nxt = self._page(members, cursor, limit)
        return Page([self._calls[u] for u in uids], nxt)

    async def profile_values(self, profile: str, now: float, cursor: str = "", limit: int = MAX_PAGE) -> Page:
        """A page of the profile's non-empty values with their sizes."""
        self._purge(now)
        values, nxt = self._page(self._values.get(profile), cursor, limit)
        return Page([(v, self._size((profile, v))) for v in values], nxt)

    async def node_calls(self, node: str, now: float, cursor: str = "", limit: int = MAX_PAGE) -> Page:
        """A page of the calls admitted through `node`."""
        self._purge(now)
        uids, nxt = self._page(self._nodes.get(node), cursor, limit)
        return Page([self._calls[u] for u in uids], nxt)

    async def stats(self, now: float) -> DialogStats:
        """Dialog statistics of this process (counters, no walk over the calls)."""
        self._purge(now)
        return DialogStats(
            active_dialogs=self._active,
            early_dialogs=len(self._calls) - self._active,
            processed_dialogs=self._processed,
            expired_dialogs=self._expired,
            failed_dialogs=self._failed,
        )

    async def sweep(self, now: float) -> list[CallRecord]:
        """Drop ended leases, compact the expiry heap; the calls that expired since the last sweep."""
        self._purge(now)
        if len(self._heap) > 2 * len(self._calls) + 1024:
            self._heap = [(r.expires, r.uid) for r in self._calls.values()]
            heapq.heapify(self._heap)
        expired, self._expired_pending = self._expired_pending, []
        return expired

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
        self._profiles.clear()
        self._values.clear()
        self._nodes.clear()
        self._heap.clear()
        self._active = 0
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
