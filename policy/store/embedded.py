"""The embedded (in-process) counter store, durable through a journal and snapshots.

Everything runs on the event loop thread and no method awaits before it has finished its
work, so each operation is atomic by construction. Expiry is lazy (every operation first
drops the leases that ended) plus a periodic sweep, so counts are right without timers.
Leases sit in a timing wheel (a bucket per second of expiry; an end takes its call out of
its bucket in O(1)); a bucket is sorted into a small heap when its second begins, so expiry
is exact, and no operation ever walks the held calls.

Durability (with a snapshot path; see `journal.py` and `snapshot.py` for the files):

- every state change appends one line to the journal, written with one `write()` at the
  start of the next loop iteration: a SIGKILL loses only the changes of the iteration it
  interrupts (one read per ready connection; their replies may have left already); a thread
  fsyncs every `fsync_interval`, so a power loss loses at most that long;
- every `snapshot_interval`, if anything changed, the journal is rotated (O(1) on the loop)
  and a child process folds the last snapshot and the closed segments into a new snapshot:
  the loop never serializes the held calls;
- on `close` (SIGTERM) a final snapshot is written from memory; if that fails the journal is
  kept, so the next start loses nothing, and `close` raises SnapshotError;
- at start: snapshot, then the journal segments in order (a torn last line is tolerated),
  leases that ended are dropped, and a fresh snapshot replaces the replayed segments;
- one process per state: an exclusive flock on `S.lock` for the process's life.

Call rates: a dict of token buckets, (rule, value) -> [tokens, time, full at], refilled with
the `now` of each check; a bucket is forgotten once it is full again (a heap of those times), so
idle keys take no memory. Buckets are not journaled: after a restart a bucket
starts with what it would have gathered since the previous process last wrote its state (the
newest snapshot or journal file), never with a fresh burst, so a restart cannot let more than
`rate * T + burst` calls through in any window.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import heapq
import math
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import orjson
import structlog

from policy.errors import SnapshotError, StoreError
from policy.store import journal as journal_mod
from policy.store import snapshot as snapshot_mod
from policy.store.base import (
    FAILED_REASONS,
    MAX_PAGE,
    CallInfo,
    CallRecord,
    CounterStore,
    DialogStats,
    Page,
    PlanEntry,
    RateEntry,
    ReserveResult,
)
from policy.store.journal import Journal
from policy.store.snapshot import SNAPSHOT_VERSION, StateInUseError, StateLock

log = structlog.get_logger("policy.store.embedded")

ProfileKey = tuple[str, str | None]
#: The lease wheel's bucket width: leases ending within one such span share a bucket.
WHEEL_SECONDS = 1.0
_NEVER = -(1 << 62)  # a slot before any other
BucketKey = tuple[str, str | None]

__all__ = ["SNAPSHOT_VERSION", "EmbeddedStore", "StateInUseError"]


class EmbeddedStore(CounterStore):
    """Profile counters in this process's memory."""

    name = "embedded"
    answers_inline = True

    def __init__(
        self,
        *,
        snapshot_path: str | os.PathLike[str] | None = None,
        snapshot_interval: float = 10.0,
        fsync_interval: float = 1.0,
        clock: Callable[[], float] | None = None,
        compaction_timeout: float = 300.0,
        close_wait: float = 30.0,
    ) -> None:
        self._calls: dict[str, CallRecord] = {}  # uid -> record
        # indexes, each member -> the sequence number it was indexed under (see _page):
        self._keys: dict[ProfileKey, dict[str, int]] = {}  # (profile, value) -> calls
        # profile -> calls in any of its keys, for a profile with valued keys; a profile used
        # without value has only its (profile, None) key, which is then the whole profile
        self._profiles: dict[str, dict[str, int]] = {}
        self._values: dict[str, dict[str, int]] = {}  # profile -> its non-empty values
        self._nodes: dict[str, dict[str, int]] = {}  # node -> calls it admitted
        self._seq = 0
        self._active = 0
        self._expired_pending: list[CallRecord] = []
        # leases, a timing wheel: a bucket per second of expiry, each call in its lease's bucket
        # (O(1) in and out, nothing left behind by an end); a bucket whose second has begun is
        # opened into the `_due` heap, which gives exact expiry. Never a walk over the calls.
        self._wheel: dict[int, dict[str, float]] = {}  # slot -> {uid: expires}
        self._slots: list[int] = []  # min-heap of the wheel's slots (each once)
        self._due: list[tuple[float, str]] = []  # (expires, uid) of the opened slots' leases
        self._opened = _NEVER  # the last slot opened into _due
        self._next_due = math.inf  # nothing can expire before this
        self._processed = 0
        self._expired = 0
        self._failed = 0
        self._buckets: dict[BucketKey, list[float]] = {}  # (rule, value) -> [tokens, ts, full_at]
        self._bucket_heap: list[tuple[float, BucketKey]] = []  # (full_at, key): when to forget it
        #: After a restart: when the previous process last wrote its state. A bucket it may have
        #: drained starts with what it gathered since (None: a new bucket starts full).
        self._rates_from: float | None = None
        self._snapshot_path = Path(snapshot_path) if snapshot_path else None
        self._snapshot_interval = snapshot_interval
        self._fsync_interval = fsync_interval
        self._compaction_timeout = compaction_timeout
        self._close_wait = close_wait
        self._clock = clock
        self._journal: Journal | None = None
        self._lock: StateLock | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._compacting: asyncio.Future[dict[str, Any]] | None = None
        self._child: subprocess.Popen[bytes] | None = None
        self._closed_segments: dict[int, int] = {}  # closed, not yet folded: segment -> bytes
        self._closed = False
        # figures for info()
        self._restarts: dict[str, int] = {}
        self._snap: dict[str, Any] = {
            "last_snapshot_ts": None, "last_snapshot_s": None, "last_snapshot_calls": None,
            "last_snapshot_bytes": None, "last_compaction_s": None, "compactions": 0,
            "snapshot_failures": 0, "last_snapshot_error": "", "fsync_failures": 0,
        }

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Lock the state, restore it (snapshot + journal), start the fsync and compaction loops."""
        path = self._snapshot_path
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = StateLock(path)
        lock.acquire()  # StateInUseError (an OSError) names the path: `serve` cannot start
        self._lock = lock
        try:
            now = self._clock() if self._clock else time.time()
            last = _last_written(path)
            if last is not None:
                self._rates_from = min(last, now)
            self._restore(path, now)
        except BaseException:
            lock.release()
            raise
        if self._fsync_interval > 0:
            self._spawn("journal_fsync", self._fsync_loop)
        if self._snapshot_interval > 0:
            self._spawn("compactor", self._compaction_loop)

    async def close(self) -> None:
        """Stop the loops, write a final snapshot from memory, release the state.

        Raises SnapshotError when the final snapshot cannot be written; the journal is then
        kept (written and fsync'ed), so the next start replays it and loses nothing.
        """
        if self._closed:
            return
        self._closed = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        await self._wait_compaction()
        try:
            if self._journal is not None and self._snapshot_path is not None:
                self._final_snapshot(self._snapshot_path, self._journal)
        finally:
            if self._lock is not None:
                self._lock.release()

    def _final_snapshot(self, path: Path, j: Journal) -> None:
        t0 = time.perf_counter()
        j.flush()
        try:
            data = self._encode(j.seq)
            snapshot_mod.write_atomic(path, data)
        except OSError as exc:
            journal_ok = True
            try:
                journal_ok = j.close()
            except OSError as jexc:
                journal_ok = False
                log.error("journal_fsync_failed", path=str(path), error=str(jexc))
            segments = [str(p) for _, p in journal_mod.list_segments(path)]
            self._snap["snapshot_failures"] += 1
            self._snap["last_snapshot_error"] = str(exc)
            log.error("snapshot_write_failed", path=str(path), error=str(exc), final=True,
                      journal_kept=segments, journal_unwritten_bytes=j.unwritten_bytes)
            if journal_ok:
                lost = "the journal is kept and the next start replays it: nothing is lost"
            else:
                lost = (f"the journal could not be written either ({j.unwritten_bytes} bytes, "
                        f"{j.last_write_error}): the changes since its last write are lost")
            raise SnapshotError(f"final snapshot {path} not written: {exc}; {lost}") from exc
        with contextlib.suppress(OSError):  # the snapshot is durable: the journal is spare
            j.close()
        for _seq, seg in journal_mod.list_segments(path):
            if _seq <= j.seq:
                with contextlib.suppress(OSError):
                    os.unlink(seg)
        with contextlib.suppress(OSError):
            snapshot_mod.fsync_dir(path.parent)
        self._journal = None
        log.info("snapshot_written", path=str(path), calls=len(self._calls), bytes=len(data), final=True,
                 duration_s=round(time.perf_counter() - t0, 6))

    def _spawn(self, name: str, body: Callable[[], Awaitable[None]]) -> None:
        self._restarts.setdefault(name, 0)
        self._tasks.append(asyncio.get_running_loop().create_task(self._supervise(name, body),
                                                                  name=f"embedded-{name}"))

    async def _supervise(self, name: str, body: Callable[[], Awaitable[None]]) -> None:
        """Run a background loop; if it fails, log the traceback and restart it with backoff."""
        delay = 0.1
        while True:
            started = time.monotonic()
            try:
                await body()
                return
            except asyncio.CancelledError:
                raise
            except Exception:
                self._restarts[name] += 1
                if time.monotonic() - started > 60.0:
                    delay = 0.1  # it ran fine for a while: a fresh failure, not a crash loop
                log.error("background_task_failed", task=name, restarts=self._restarts[name],
                          retry_in_s=delay, exc_info=True)
                await asyncio.sleep(delay)
                delay = min(delay * 2.0, 30.0)

    async def _fsync_loop(self) -> None:
        while True:
            await asyncio.sleep(self._fsync_interval)
            j = self._journal
            if j is not None and j.unsynced:
                try:
                    await asyncio.to_thread(j.sync)
                except OSError as exc:
                    self._snap["fsync_failures"] += 1
                    log.error("journal_fsync_failed", path=str(self._snapshot_path), error=str(exc))

    async def _compaction_loop(self) -> None:
        while True:
            await asyncio.sleep(self._snapshot_interval)
            j = self._journal
            if j is not None and (j.segment_bytes or j.unwritten_bytes or self._closed_segments):
                await self.compact()

    # -- snapshots ---------------------------------------------------------------------

    async def compact(self) -> bool:
        """Rotate the journal and fold it into a new snapshot in a child process; True if written.

        The loop only flushes the journal and opens the next segment; the fold, the write and
        the fsyncs happen in the child, which reads files, never this process's memory.
        """
        j, path = self._journal, self._snapshot_path
        if j is None or path is None or self._compacting is not None:
            return False
        size = j.segment_bytes + j.unwritten_bytes
        through = j.rotate()
        if through is None:
            log.warning("compaction_skipped", path=str(path), reason=j.last_write_error)
            return False
        self._closed_segments[through] = size
        t0 = time.perf_counter()
        fut = asyncio.get_running_loop().run_in_executor(None, self._fold, path, j, through)
        fut.add_done_callback(_consume)
        self._compacting = fut
        try:
            summary = await asyncio.shield(fut)
        except asyncio.CancelledError:
            raise  # close() waits for the child itself
        except (OSError, SnapshotError) as exc:
            self._compacting = None
            self._snap["snapshot_failures"] += 1
            self._snap["last_snapshot_error"] = str(exc)
            log.error("snapshot_write_failed", path=str(path), error=str(exc), final=False,
                      journal_kept=sorted(self._closed_segments))
            return False
        self._compacting = None
        for seq in [s for s in self._closed_segments if s <= int(summary["through"])]:
            del self._closed_segments[seq]
        self._snap.update(
            last_snapshot_ts=time.time(), last_snapshot_s=summary["duration_s"],
            last_snapshot_calls=summary["calls"], last_snapshot_bytes=summary["bytes"],
            last_compaction_s=round(time.perf_counter() - t0, 6),
            compactions=self._snap["compactions"] + 1, last_snapshot_error="")
        log.debug("snapshot_written", path=str(path), final=False, **summary)
        return True

    def _fold(self, path: Path, j: Journal, through: int) -> dict[str, Any]:
        """(In a thread.) Make the closed segments durable, then run the compaction child."""
        j.sync()
        root = str(Path(__file__).resolve().parent.parent.parent)
        env = dict(os.environ)
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        cmd = [sys.executable, "-P", "-m", "policy.store.snapshot", "compact", str(path), str(through),
               str(os.getpid())]
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env=env, close_fds=True)
        self._child = proc
        try:
            try:
                out, err = proc.communicate(timeout=self._compaction_timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
                raise SnapshotError(f"compaction took over {self._compaction_timeout} s and was killed") from None
        finally:
            self._child = None
            if proc.returncode != 0:
                with contextlib.suppress(OSError):
                    os.unlink(snapshot_mod.tmp_path(path))
        try:
            summary: dict[str, Any] = orjson.loads(out.splitlines()[-1])
        except (IndexError, orjson.JSONDecodeError):
            raise SnapshotError(f"compaction exited {proc.returncode}: "
                                f"{err.decode(errors='replace').strip()[-500:]}") from None
        if proc.returncode != 0 or not summary.get("ok"):
            raise SnapshotError(str(summary.get("error") or f"compaction exited {proc.returncode}"))
        return summary

    async def _wait_compaction(self) -> None:
        """Let a running compaction finish (bounded), so no child writes after us."""
        fut = self._compacting
        if fut is None:
            return
        if not fut.done():
            try:
                await asyncio.wait_for(asyncio.shield(fut), self._close_wait)
            except TimeoutError:
                child = self._child
                if child is not None:
                    with contextlib.suppress(OSError):
                        child.kill()
                await asyncio.wait([fut])
            except Exception:  # its failure was logged by compact()
                pass
        self._compacting = None

    def _encode(self, through: int) -> bytes:
        """A snapshot of memory, covering the journal up to segment `through`."""
        rows = [snapshot_mod.record_to_row(r) for r in self._calls.values()]
        return snapshot_mod.encode(rows, self._processed, self._expired, self._failed, through)

    def _restore(self, path: Path, now: float) -> None:
        """Load the snapshot, replay the journal, drop ended leases, write a fresh snapshot, open the journal."""
        tmp = snapshot_mod.tmp_path(path)
        if tmp.exists():
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            log.warning("snapshot_tmp_removed", path=str(tmp))
        gc_was = gc.isenabled()
        gc.disable()  # hundreds of thousands of small containers: the collector would triple the time
        try:
            state = self._read_snapshot(path, now)
            replayed: list[int] = []
            lines = 0
            for seq, seg in journal_mod.list_segments(path):
                if seq <= state.through:  # folded already; its deletion did not finish
                    with contextlib.suppress(OSError):
                        os.unlink(seg)
                    continue
                try:
                    report = journal_mod.replay(seg, state)
                except OSError as exc:
                    log.error("journal_unreadable", path=str(seg), error=str(exc))
                    continue
                replayed.append(seq)
                lines += report.lines
                if report.torn_bytes:
                    log.warning("journal_tail_torn", path=str(seg), bytes=report.torn_bytes)
                if report.bad_lines:
                    log.error("journal_lines_skipped", path=str(seg), count=report.bad_lines,
                              first=report.first_bad)
            dropped = self._load_state(state, now)
        finally:
            if gc_was:
                gc.enable()
        through = max([state.through, *replayed])
        unjournaled_drops: list[str] = []
        if replayed or dropped or state.version != SNAPSHOT_VERSION:
            t0 = time.perf_counter()
            try:
                data = self._encode(through)
                snapshot_mod.write_atomic(path, data)
            except OSError as exc:  # keep the segments: the first compaction folds them
                self._snap["snapshot_failures"] += 1
                self._snap["last_snapshot_error"] = str(exc)
                log.error("snapshot_write_failed", path=str(path), error=str(exc), final=False, at_start=True)
                unjournaled_drops = dropped
                for seq in replayed:
                    with contextlib.suppress(OSError):
                        self._closed_segments[seq] = journal_mod.segment_path(path, seq).stat().st_size
            else:
                for seq in replayed:
                    with contextlib.suppress(OSError):
                        os.unlink(journal_mod.segment_path(path, seq))
                self._snap.update(last_snapshot_ts=time.time(), last_snapshot_calls=len(self._calls),
                                  last_snapshot_bytes=len(data),
                                  last_snapshot_s=round(time.perf_counter() - t0, 6))
        j = Journal(path, through + 1, on_write_error=self._journal_failed,
                    on_write_recovered=self._journal_recovered)
        j.open()
        self._journal = j
        for uid in unjournaled_drops:  # the drops must survive a restart that replays the old segments
            j.expire(uid)
        log.info("snapshot_restored", path=str(path), calls=len(self._calls), expired=len(dropped),
                 journal_segments=len(replayed), journal_lines=lines)

    def _read_snapshot(self, path: Path, now: float) -> snapshot_mod.State:
        if not path.exists():
            log.info("snapshot_absent", path=str(path))
            return snapshot_mod.State()
        try:
            return snapshot_mod.read(path)
        except (OSError, SnapshotError) as exc:
            aside = path.with_name(f"{path.name}.corrupt-{int(now)}")
            with contextlib.suppress(OSError):
                os.replace(path, aside)
            log.error("snapshot_unreadable", path=str(path), moved_to=str(aside), error=str(exc))
            return snapshot_mod.State()

    def _load_state(self, state: snapshot_mod.State, now: float) -> list[str]:
        """Replace memory with `state`, dropping calls whose lease ended; the uids dropped."""
        self._calls.clear()
        self._keys.clear()
        self._profiles.clear()
        self._values.clear()
        self._nodes.clear()
        self._wheel.clear()
        self._slots.clear()
        self._due.clear()
        self._opened = _NEVER
        self._next_due = math.inf
        self._active = 0
        dropped: list[str] = []
        bad = 0
        for uid, row in state.calls.items():
            try:
                rec = snapshot_mod.row_to_record(row)
            except ValueError as exc:
                bad += 1
                if bad == 1:
                    log.error("snapshot_call_skipped", path=str(self._snapshot_path), error=str(exc))
                continue
            if rec.expires <= now:
                dropped.append(uid)
                continue
            self._add(rec)
        self._processed, self._expired, self._failed = state.processed, state.expired + len(dropped), state.failed
        return dropped

    def _journal_failed(self, exc: OSError, unwritten: int) -> None:
        log.error("journal_write_failed", path=str(self._snapshot_path), error=str(exc), unwritten_bytes=unwritten)

    def _journal_recovered(self, errors: int) -> None:
        log.warning("journal_write_recovered", path=str(self._snapshot_path), errors=errors)

    def flush_journal(self) -> bool:
        """Write the buffered journal lines now (they are otherwise written at the end of this loop
        iteration); True when nothing is left unwritten."""
        return self._journal.flush() if self._journal is not None else True

    def info(self) -> dict[str, Any]:
        """Calls held, journal and snapshot figures, background-task restarts (cheap, no I/O)."""
        out: dict[str, Any] = {"calls": len(self._calls), "rate_buckets": len(self._buckets)}
        j = self._journal
        if self._snapshot_path is not None:
            out["snapshot_path"] = str(self._snapshot_path)
            out.update(self._snap)
        if j is not None:
            out.update(j.info())
            out["journal_segments"] = len(self._closed_segments) + 1
            out["journal_bytes"] = sum(self._closed_segments.values()) + j.segment_bytes
        out["task_restarts"] = dict(self._restarts)
        return out

    # -- internals ---------------------------------------------------------------------
    #
    # Every index maps a call's uid to the sequence number it was indexed under; dicts keep
    # insertion order, so the numbers rise along each index and a listing's cursor is the
    # last number it returned: pages never skip a call that stays, whatever else leaves.

    def _purge(self, now: float) -> int:
        """Drop the leases that ended by `now` (callers test `now >= self._next_due` first)."""
        slots = self._slots
        due = self._due
        wheel = self._wheel
        while slots and slots[0] * WHEEL_SECONDS <= now:  # a bucket's second began: open it
            slot = heapq.heappop(slots)
            if slot > self._opened:
                self._opened = slot
            bucket = wheel.pop(slot, None)
            if bucket:
                for uid, expires in bucket.items():
                    heapq.heappush(due, (expires, uid))
        dropped = 0
        while due and due[0][0] <= now:
            expires, uid = heapq.heappop(due)
            rec = self._calls.get(uid)
            if rec is not None and rec.expires == expires:  # else ended or leased again since
                self._remove(rec)
                self._expired += 1
                self._expired_pending.append(rec)
                dropped += 1
        self._next_due = min(slots[0] * WHEEL_SECONDS if slots else math.inf, due[0][0] if due else math.inf)
        return dropped

    def _index_lease(self, uid: str, expires: float) -> None:
        """Put a lease in the wheel (or straight into `_due` when its second has begun)."""
        slot = int(expires // WHEEL_SECONDS)
        if slot <= self._opened:
            heapq.heappush(self._due, (expires, uid))
            if expires < self._next_due:
                self._next_due = expires
            return
        bucket = self._wheel.get(slot)
        if bucket is None:
            self._wheel[slot] = {uid: expires}
            heapq.heappush(self._slots, slot)  # an emptied bucket stays until its second: pushed once
            start = slot * WHEEL_SECONDS
            if start < self._next_due:
                self._next_due = start
        else:
            bucket[uid] = expires

    def _unindex_lease(self, uid: str, expires: float) -> None:
        """Take a lease out of the wheel (one in `_due` is skipped when it surfaces)."""
        slot = int(expires // WHEEL_SECONDS)
        if slot > self._opened:
            bucket = self._wheel.get(slot)
            if bucket is not None:
                bucket.pop(uid, None)

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
        # on every end: the index updates are inlined (no call per key)
        uid = rec.uid
        del self._calls[uid]
        slot = int(rec.expires // WHEEL_SECONDS)  # _unindex_lease, inlined
        if slot > self._opened:
            bucket = self._wheel.get(slot)
            if bucket is not None:
                bucket.pop(uid, None)
        keys = self._keys
        profiles = self._profiles
        for key in rec.profiles:
            members = keys.get(key)
            if members is not None:
                members.pop(uid, None)
                if not members:
                    del keys[key]
                    if key[1] is not None:
                        self._unindex(self._values, key[0], key[1])
            members = profiles.get(key[0])
            if members is not None:  # None: a profile listed twice, emptied at its first key
                members.pop(uid, None)
                if not members:
                    del profiles[key[0]]
        self._unindex(self._nodes, rec.node, uid)
        if rec.state == "active":
            self._active -= 1

    def _whole(self, profile: str) -> dict[str, int] | None:
        """Every call in any key of the profile (its index, or its only key's when it has no value)."""
        members = self._profiles.get(profile)
        return members if members is not None else self._keys.get((profile, None))

    def _size(self, key: ProfileKey) -> int:
        members = self._keys.get(key)
        return 0 if members is None else len(members)

    def _lease(self, rec: CallRecord, now: float, timeout: float) -> None:
        uid = rec.uid
        self._unindex_lease(uid, rec.expires)
        rec.timeout = timeout
        rec.expires = now + timeout
        self._index_lease(uid, rec.expires)

    def _add(self, rec: CallRecord) -> None:
        """Index a new record (`reserve` does the same inline: change both together)."""
        uid = rec.uid
        self._calls[uid] = rec
        self._seq += 1
        seq = self._seq
        keys = self._keys
        profiles = self._profiles
        for key in rec.profiles:
            members = keys.get(key)
            if members is None:
                keys[key] = {uid: seq}
                if key[1] is not None:
                    values = self._values.get(key[0])
                    if values is None:
                        self._values[key[0]] = {key[1]: seq}
                    else:
                        values[key[1]] = seq
            else:
                members[uid] = seq
            members = profiles.get(key[0])
            if members is not None:
                members[uid] = seq  # a profile listed twice keeps its first place
            elif key[1] is not None:  # the profile's first valued key: its whole-profile index
                whole = keys.get((key[0], None))  # calls in its no-value key (a rules change) come first
                members = profiles[key[0]] = dict(whole) if whole else {}
                members[uid] = seq
        members = self._nodes.get(rec.node)
        if members is None:
            self._nodes[rec.node] = {uid: seq}
        else:
            members[uid] = seq
        if rec.state == "active":
            self._active += 1
        expires = rec.expires
        bucket = self._wheel.get(int(expires // WHEEL_SECONDS))  # _index_lease, inlined when it has a bucket
        if bucket is not None:
            bucket[uid] = expires
        else:
            self._index_lease(uid, expires)

    def _token_ok(self, rec: CallRecord, token: str | None) -> bool:
        return not token or rec.token == token

    def _forget_buckets(self, now: float) -> None:
        """Drop the buckets that are full again by `now` (a new one would start full)."""
        heap = self._bucket_heap
        buckets = self._buckets
        while heap and heap[0][0] <= now:
            _, key = heapq.heappop(heap)
            b = buckets.get(key)
            if b is not None and b[2] <= now:
                del buckets[key]
        if len(heap) > 2 * len(buckets) + 1024:
            self._bucket_heap = [(b[2], k) for k, b in buckets.items()]
            heapq.heapify(self._bucket_heap)

    def _rate_tokens(self, rates: Sequence[RateEntry], now: float) -> tuple[list[float], list[float], int | None]:
        """Each rate's tokens at `now` (refilled, not taken), the bucket times, and the first
        enforced rate without a whole token."""
        if self._bucket_heap and self._bucket_heap[0][0] <= now:
            self._forget_buckets(now)
        buckets = self._buckets
        tokens: list[float] = []
        times: list[float] = []
        blocked = None
        for j, (rule, value, rate, burst, shadow) in enumerate(rates):
            b = buckets.get((rule, value))
            if b is None:
                since = self._rates_from
                t = float(burst) if since is None else min(burst, max(0.0, now - since) * rate)
                ts = now
            else:
                t, ts = b[0], b[1]
                if now > ts:
                    t = min(burst, t + (now - ts) * rate)
                    ts = now
                else:  # a clock behind the bucket's: no refill, and its time stays
                    t = min(burst, t)
            tokens.append(t)
            times.append(ts)
            if t < 1.0 and not shadow and blocked is None:
                blocked = j
        return tokens, times, blocked

    def _take_tokens(self, rates: Sequence[RateEntry], tokens: list[float], times: list[float]) -> None:
        """An admitted call takes a token from each bucket that has one."""
        buckets = self._buckets
        heap = self._bucket_heap
        for j, (rule, value, rate, burst, _shadow) in enumerate(rates):
            t = tokens[j]
            if t < 1.0:
                continue  # a shadow rate that would have refused: nothing to take
            t -= 1.0
            ts = times[j]
            full_at = ts + (burst - t) / rate
            key = (rule, value)
            buckets[key] = [t, ts, full_at]
            heapq.heappush(heap, (full_at, key))

    # -- operations --------------------------------------------------------------------

    async def reserve(
        self, call: CallInfo, plan: Sequence[PlanEntry], now: float, timeout: float, token: str,
        force: bool = False, rates: Sequence[RateEntry] = (),
    ) -> ReserveResult:
        """Admit the call into every key of the plan and take a token of each rate, or do nothing."""
        if now >= self._next_due:
            self._purge(now)
        uid = call.uid
        held = self._calls.get(uid)
        if held is not None:
            current = [self._size(e.key) for e in plan]
            if not held.same_call(call):
                return ReserveResult(False, False, None, current, held, True)
            if held.token != token:
                held.token = token  # a later attempt takes the admission over
                if self._journal is not None:
                    self._journal.token(uid, token)
            return ReserveResult(True, True, None, current, held)
        index = self._keys
        sizes: list[int] = []
        joined: list[ProfileKey] = []
        found: list[dict[str, int] | None] = []
        blocked = None
        for i, (profile, value, limit, shadow, _rule) in enumerate(plan):
            key = (profile, value)
            members = index.get(key)
            n = len(members) if members else 0
            sizes.append(n)
            joined.append(key)
            found.append(members)
            if limit is not None and n >= limit and not shadow and blocked is None and not force:
                blocked = i
        tokens: list[float] = []
        if rates and not force:
            tokens, times, rate_blocked = self._rate_tokens(rates, now)
            if blocked is not None or rate_blocked is not None:
                return ReserveResult(False, False, blocked, sizes, None, False, rate_blocked, tokens)
            self._take_tokens(rates, tokens, times)
        elif blocked is not None:
            return ReserveResult(False, False, blocked, sizes, None)
        keys = list(dict.fromkeys(joined))
        rec = CallRecord(call.call_id, call.from_uri, call.to_uri, call.account, "early", now, None,
                         timeout, now + timeout, keys, call.from_tag, call.node, token,
                         dict(call.vars) if call.vars else {})
        self._processed += 1
        if len(keys) != len(plan):  # a key listed twice: count the call once
            self._add(rec)
            if self._journal is not None:
                self._journal.reserve(rec)
            return ReserveResult(True, False, None, [self._size(e.key) for e in plan], rec, False, None, tokens)
        # _add, inlined with the keys' member dicts just looked up
        self._calls[uid] = rec
        self._seq += 1
        seq = self._seq
        profiles = self._profiles
        for key, members in zip(keys, found, strict=True):
            profile, value = key
            if members is None:
                index[key] = {uid: seq}
                if value is not None:
                    values = self._values.get(profile)
                    if values is None:
                        self._values[profile] = {value: seq}
                    else:
                        values[value] = seq
            else:
                members[uid] = seq
            members = profiles.get(profile)
            if members is not None:
                members[uid] = seq
            elif value is not None:
                whole = index.get((profile, None))
                members = profiles[profile] = dict(whole) if whole else {}
                members[uid] = seq
        members = self._nodes.get(rec.node)
        if members is None:
            self._nodes[rec.node] = {uid: seq}
        else:
            members[uid] = seq
        expires = rec.expires
        bucket = self._wheel.get(int(expires // WHEEL_SECONDS))
        if bucket is not None:
            bucket[uid] = expires
        else:
            self._index_lease(uid, expires)
        if self._journal is not None:
            self._journal.reserve(rec)
        return ReserveResult(True, False, None, [n + 1 for n in sizes], rec, False, None, tokens)

    async def answer(self, uid: str, now: float, timeout: float, token: str | None = None) -> CallRecord | None:
        """Mark a held call answered and give it the answered-call lease."""
        if now >= self._next_due:
            self._purge(now)
        rec = self._calls.get(uid)
        if rec is None or not self._token_ok(rec, token):
            return rec
        if rec.state != "active":
            rec.state = "active"
            rec.start_ts = now
            self._active += 1
        self._lease(rec, now, timeout)
        if self._journal is not None:
            self._journal.answer(uid, rec)
        return rec

    async def refresh(self, uid: str, now: float, timeout: float, token: str | None = None) -> CallRecord | None:
        """Extend a held call's lease."""
        if now >= self._next_due:
            self._purge(now)
        rec = self._calls.get(uid)
        if rec is None or not self._token_ok(rec, token):
            return rec
        self._lease(rec, now, timeout)
        if self._journal is not None:
            self._journal.refresh(uid, rec)
        return rec

    async def end(self, uid: str, now: float, reason: str, token: str | None = None) -> CallRecord | None:
        """Release a held call."""
        if now >= self._next_due:
            self._purge(now)
        rec = self._calls.get(uid)
        if rec is None or not self._token_ok(rec, token):
            return rec
        self._remove(rec)
        if self._journal is not None:
            self._journal.end(uid, reason)
        if reason in FAILED_REASONS:
            self._failed += 1
        elif reason == "timeout":
            self._expired += 1
        return rec

    async def set_var(self, uid: str, name: str, value: str | None, now: float) -> CallRecord | None:
        """Set or delete one of a held call's variables."""
        if now >= self._next_due:
            self._purge(now)
        rec = self._calls.get(uid)
        if rec is None:
            return None
        if value is None:
            rec.vars.pop(name, None)
        else:
            rec.vars[name] = value
        if self._journal is not None:
            self._journal.set_var(uid, name, value)
        return rec

    async def get_call(self, uid: str, now: float) -> CallRecord | None:
        """The record of a held call."""
        if now >= self._next_due:
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
        if now >= self._next_due:
            self._purge(now)
        if value is not None:
            return self._size((profile, value))
        members = self._whole(profile)
        return 0 if members is None else len(members)

    async def profile_list(self, profile: str, value: str | None, now: float,
                           cursor: str = "", limit: int = MAX_PAGE) -> Page:
        """A page of the calls in the key (or the whole profile), oldest first."""
        if now >= self._next_due:
            self._purge(now)
        members = self._keys.get((profile, value)) if value is not None else self._whole(profile)
        uids, nxt = self._page(members, cursor, limit)
        return Page([self._calls[u] for u in uids], nxt)

    async def profile_values(self, profile: str, now: float, cursor: str = "", limit: int = MAX_PAGE) -> Page:
        """A page of the profile's non-empty values with their sizes."""
        if now >= self._next_due:
            self._purge(now)
        values, nxt = self._page(self._values.get(profile), cursor, limit)
        return Page([(v, self._size((profile, v))) for v in values], nxt)

    async def node_calls(self, node: str, now: float, cursor: str = "", limit: int = MAX_PAGE) -> Page:
        """A page of the calls admitted through `node`."""
        if now >= self._next_due:
            self._purge(now)
        uids, nxt = self._page(self._nodes.get(node), cursor, limit)
        return Page([self._calls[u] for u in uids], nxt)

    async def stats(self, now: float) -> DialogStats:
        """Dialog statistics of this process (counters, no walk over the calls)."""
        if now >= self._next_due:
            self._purge(now)
        return DialogStats(
            active_dialogs=self._active,
            early_dialogs=len(self._calls) - self._active,
            processed_dialogs=self._processed,
            expired_dialogs=self._expired,
            failed_dialogs=self._failed,
        )

    async def sweep(self, now: float) -> list[CallRecord]:
        """Drop ended leases and idle rate buckets; the calls that expired since the last sweep."""
        if now >= self._next_due:
            self._purge(now)
        self._forget_buckets(now)
        expired, self._expired_pending = self._expired_pending, []
        return expired



def _last_written(path: Path) -> float | None:
    """When the state at `path` was last written (the newest snapshot or journal file), or None
    when there is none: the previous process took no token after that."""
    newest = None
    for p in [path, *(seg for _, seg in journal_mod.list_segments(path))]:
        try:
            mtime = p.stat().st_mtime
        except OSError:
            continue
        newest = mtime if newest is None else max(newest, mtime)
    return newest


def _consume(fut: asyncio.Future[Any]) -> None:
    """Retrieve a background future's outcome, so a failure nobody awaited is not reported twice."""
    if not fut.cancelled():
        fut.exception()
