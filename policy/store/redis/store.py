"""The Redis counter store: the operations of the store contract, one Lua script (or one plain
command on a declared key) each.

Every instance sharing a Redis and a prefix sees one truth: a cap of 10 holds across all of
them, and a call admitted by an instance that died is still listed, still released by `end`,
and dropped at its lease expiry otherwise. The parts: `keys` (the layout), `codec` (records and
reserve arguments), `connection` (addresses, TLS, Sentinel, the circuit), `pipe` (batching,
deadlines, undo), `lua/*.lua` (each headed by its KEYS, ARGV and reply).

Counters, not walks: each key's size, each profile's size and the dialog stats are counters in
one hash, changed by the scripts that admit and release calls, so reading any of them is O(1).
A counter still includes a call whose lease ended until a sweep drops it; the scripts that
read counters therefore answer "sweep first" (-2) while such a call waits, the store sweeps a
batch and asks again (`STALE_ROUNDS`), and the last try goes ahead regardless (then a count can
only be too high, never too low: no call is ever admitted over a limit).

Time: Redis's clock scores every lease. On every (re)connect the store measures the offset of
Redis ``TIME`` to its own injected clock and adds it to every `now` it sends, so instances whose
clocks differ keep exact leases; records are converted back with the reader's own offset.

Data loss: an epoch marker in the counters hash, adopted on connect, is checked on every
reconnect and by every reserve (the check path: reserve.lua answers -1 when it is gone) and
sweep. A loss is logged (``redis_data_lost``), counted (`info()`), and the store then
*rebuilds*: `reserve` raises StoreError (checks follow the rules' ``on_store_error``) until the
optional async callback `on_data_loss` (reconciliation with the proxies, set by the server)
has run; then it trusts its counts again (``redis_rebuilt``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import os
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from importlib import resources
from typing import TYPE_CHECKING, Any

import hiredis
import structlog

from policy.clock import Clock
from policy.errors import StoreError
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
from policy.store.redis.codec import (
    ReserveEncoder,
    decode_record,
    live_record,
    maybe_record,
    num,
    unpack_items,
)
from policy.store.redis.connection import Circuit, ReplyError, RespConnection, parse_target, roundtrip
from policy.store.redis.keys import KeyLayout, escape, kid
from policy.store.redis.pipe import Pipe, budget_of

if TYPE_CHECKING:
    from policy.settings import Settings

log = structlog.get_logger("policy.store.redis")

SCRIPTS = ("reserve", "lease", "end", "undo", "set_var", "size", "stats", "values", "walk", "sweep", "epoch")
#: What `reserve` raises while the store rebuilds after Redis lost its data.
REBUILDING = "redis lost its data; rebuilding from the proxies"
#: Tries of a counter-reading script while ended leases wait for a sweep (each after a sweep
#: batch), within half the operation's timeout; the last one goes ahead regardless.
STALE_ROUNDS = 20
#: Calls one sweep script drops at most, and the time it may run (it stops early past it),
#: so that no script shows in a SLOWLOG at 5 ms even on a loaded machine.
SWEEP_BATCH = 100
SWEEP_BUDGET_US = 1000
#: Reports of expired calls one sweep script hands out at most.
REPORT_BATCH = 500
#: Sweep scripts per `sweep` call at most (the service sweeps every second anyway).
SWEEP_ROUNDS = 50
#: Expired records kept for a sweep to report at most (older ones are discarded).
MAX_REPORTS = 100_000
#: Tries of the `on_data_loss` callback before the store trusts its counts regardless.
REBUILD_ATTEMPTS = 3
#: The clock offset is rounded to this (2**-10 s), so `now + offset - offset == now` holds.
OFFSET_QUANTUM = 1.0 / 1024


def script_source(name: str) -> str:
    """The text Redis runs for script `name`: the shared helpers, then the script."""
    base = resources.files("policy.store.redis") / "lua"
    lib = "\n".join((base / f).read_text(encoding="utf-8") for f in ("_codec.lua", "_lib.lua"))
    body = (base / f"{name}.lua").read_text(encoding="utf-8")
    return body if name == "epoch" else lib + "\n" + body


class RedisStore(CounterStore):
    """Dialog-profile counters shared through Redis by every service instance."""

    name = "redis"

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "callpolicy",
        timeout: float = 0.05,
        connect_timeout: float = 1.0,
        sentinels: Sequence[str] | None = None,
        sentinel_service: str = "mymaster",
        clock: Clock | None = None,
    ) -> None:
        if not timeout > 0:
            raise StoreError(f"redis store timeout must be > 0, not {timeout!r}")
        if not connect_timeout > 0:
            raise StoreError(f"redis store connect_timeout must be > 0, not {connect_timeout!r}")
        self.url = url
        self.prefix = prefix
        self.timeout = timeout
        self.budget = budget_of(timeout)  # what an operation may wait for Redis (pipe.py)
        self.connect_timeout = connect_timeout
        self.clock = clock
        self.target = parse_target(url, sentinels, sentinel_service)
        self.layout = KeyLayout(prefix)
        self._encoder = ReserveEncoder(self.layout)
        self._sources = {name: script_source(name) for name in SCRIPTS}
        self._sha = {name: hashlib.sha1(src.encode()).hexdigest() for name, src in self._sources.items()}
        self.circuit = Circuit(self.target, connect_timeout=connect_timeout, prepare=self._prepare,
                               attach=self._attach, log=log)
        self._pipe = Pipe(self.circuit, timeout=timeout, hang_timeout=max(timeout + 0.45, 0.5),
                          undo_command=self._undo_command, reload_commands=self._reload_commands,
                          on_undone=self._undone)
        self._offset = 0.0  # Redis TIME minus our clock, measured on connect
        self._epoch: str | None = None  # the data-loss marker this store trusts
        self._rebuilding = False
        self._adopted = False  # during a rebuild: the marker in force was adopted
        self._lost_again = False
        self._pending_loss: str | None = None
        self._rebuild_task: asyncio.Task[None] | None = None
        self._catching: asyncio.Task[None] | None = None
        #: Awaited after a data loss, before the counts are trusted again (the server sets it
        #: to reconcile with every proxy: force-reserve the calls they really have).
        self.on_data_loss: Callable[[], Awaitable[None]] | None = None
        self.data_losses = 0
        self.rebuild_seconds: float | None = None
        self.undone = 0
        self.handed_back = 0

    @classmethod
    def from_settings(cls, settings: Settings, clock: Clock | None = None) -> RedisStore:
        """The store service.toml asks for (`store = "redis"` or a redis URL)."""
        store = settings.store
        url = store if store.startswith(("redis://", "rediss://", "unix://", "redis+sentinel://")) \
            else settings.redis_url
        return cls(
            url,
            prefix=settings.redis_prefix,
            timeout=settings.store_timeout,
            connect_timeout=settings.store_connect_timeout,
            sentinels=list(settings.redis_sentinels) or None,
            sentinel_service=settings.redis_service,
            clock=clock,
        )

    # -- counters and health ---------------------------------------------------------------

    @property
    def batches(self) -> int:
        """Writes to Redis so far (each carries every command of one tick)."""
        return self._pipe.batches

    @property
    def ops(self) -> int:
        """Commands written so far."""
        return self._pipe.ops

    @property
    def errors(self) -> int:
        """Operations that failed (Redis down, late, refused)."""
        return self._pipe.errors

    def info(self) -> dict[str, Any]:
        """Health for `stats` and metrics (no I/O)."""
        c = self.circuit
        return {
            "state": "rebuilding" if self._rebuilding else c.state,
            "circuit": c.state,
            "reason": c.reason or None,
            "down_for": round(time.monotonic() - c.down_since, 3) if c.down_since is not None else None,
            "where": c.where,
            "address": str(c.address) if c.address else None,
            "prefix": self.prefix,
            "clock_offset": self._offset,
            "epoch": self._epoch,
            "rebuilding": self._rebuilding,
            "data_losses": self.data_losses,
            "last_rebuild_seconds": self.rebuild_seconds,
            "connects": c.connects,
            "connect_failures": c.failed_attempts,
            "errors": self._pipe.errors,
            "batches": self._pipe.batches,
            "ops": self._pipe.ops,
            "late_replies": self._pipe.late_replies,
            "undone": self.undone,
            "handed_back": self.handed_back,
            "undo_pending": len(self._pipe.undo_parked),
        }

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Start connecting; wait (bounded) for the first attempt. Redis down is not fatal."""
        self._pipe.closed = False
        self.circuit.start()
        if not await self.circuit.first_attempt():
            log.warning("redis_unavailable_at_start", where=self.circuit.where, error=self.circuit.reason)

    async def close(self) -> None:
        """Stop reconnecting and rebuilding, fail what waits, disconnect."""
        self._pipe.close()
        await self.circuit.close()
        for task in (self._rebuild_task, self._catching):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        self._rebuild_task = self._catching = None

    async def _prepare(self, conn: RespConnection) -> None:
        """Run on each new connection before it is used: scripts, clock offset, epoch."""
        counts = self.layout.counts
        replies = await roundtrip(conn, [*(("SCRIPT", "LOAD", self._sources[n]) for n in SCRIPTS),
                                         ("HGET", counts, "epoch")])
        for name, sha in zip(SCRIPTS, replies, strict=False):
            if isinstance(sha, ReplyError) or sha != self._sha[name]:
                raise StoreError(f"redis did not load script {name}: {sha}")
        current = replies[-1]
        if isinstance(current, ReplyError):
            raise StoreError(f"redis refused to read the epoch: {current}")
        if self.clock is not None:
            t0 = self.clock.now()
            (when,) = await roundtrip(conn, [("TIME",)])
            t1 = self.clock.now()
            if isinstance(when, ReplyError):
                raise StoreError(f"redis refused TIME: {when}")
            redis_now = int(when[0]) + int(when[1]) / 1e6
            offset = round((redis_now - (t0 + t1) / 2) / OFFSET_QUANTUM) * OFFSET_QUANTUM
            if self.circuit.connects and abs(offset - self._offset) > 1.0:
                log.warning("redis_clock_offset_changed", where=self.circuit.where, was=self._offset, now=offset)
            elif not self.circuit.connects:
                log.info("redis_clock_offset", where=self.circuit.where, offset=offset)
            self._offset = offset
        if self._epoch is None:
            marker = os.urandom(8).hex()
            (reply,) = await roundtrip(conn, [("EVALSHA", self._sha["epoch"], 1, counts, marker)])
            if isinstance(reply, ReplyError):
                raise StoreError(f"redis refused the epoch: {reply}")
            created, self._epoch = int(reply[0]), str(reply[1])
            if created:
                log.info("redis_epoch_created", where=self.circuit.where, epoch=self._epoch)
        elif current != self._epoch:
            self._pending_loss = f"on reconnect: the epoch marker is {'gone' if current is None else 'changed'}"

    def _attach(self, conn: RespConnection) -> None:
        self._pipe.attach(conn)
        if self._pending_loss is not None:
            how, self._pending_loss = self._pending_loss, None
            self._data_lost(how)

    # -- data loss ---------------------------------------------------------------------------

    def _epoch_check(self, sent: str, current: Any, where: str) -> None:
        """A script said the marker is not `sent`: a loss, unless `sent` is already stale."""
        if sent and sent == self._epoch:
            self._data_lost(f"{where}: the epoch marker is {'gone' if not current else 'changed'}")

    def _data_lost(self, how: str) -> None:
        if self._rebuilding:
            if self._adopted:
                self._lost_again = True
            return
        self._rebuilding = True
        self._adopted = False
        self.data_losses += 1
        log.error("redis_data_lost", where=self.circuit.where, prefix=self.prefix, detected=how,
                  losses=self.data_losses, rebuild="reconciliation" if self.on_data_loss else "none")
        self._rebuild_task = asyncio.get_running_loop().create_task(self._rebuild())

    async def _rebuild(self) -> None:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        failures = 0
        try:
            while True:
                self._lost_again = False
                await self._adopt_epoch()
                self._adopted = True
                if self.on_data_loss is None:
                    log.error("redis_rebuilt", where=self.circuit.where, rebuilt=False,
                              seconds=round(loop.time() - t0, 3),
                              note="no reconciliation callback: nothing was rebuilt; calls up before the "
                                   "loss are not counted (their ends are no-ops)")
                    break
                try:
                    await self.on_data_loss()
                except Exception as exc:
                    failures += 1
                    log.error("redis_rebuild_failed", where=self.circuit.where, attempt=failures,
                              error=f"{type(exc).__name__}: {exc}")
                    if failures < REBUILD_ATTEMPTS:
                        await asyncio.sleep(min(0.5 * 2 ** failures, 5.0))
                        continue
                    log.error("redis_rebuilt", where=self.circuit.where, rebuilt=False,
                              seconds=round(loop.time() - t0, 3),
                              note=f"reconciliation failed {failures} times: trusting the counts as they are")
                    break
                if self._lost_again:
                    continue
                log.warning("redis_rebuilt", where=self.circuit.where, rebuilt=True,
                            seconds=round(loop.time() - t0, 3))
                break
        finally:
            self.rebuild_seconds = round(loop.time() - t0, 3)
            self._rebuilding = False

    async def _adopt_epoch(self) -> None:
        """Write a new marker if there is none, adopt the one in force (retrying until Redis answers)."""
        delay = 0.05
        while True:
            try:
                reply = await self._script("epoch", [self.layout.counts], [os.urandom(8).hex()],
                                           deadline=asyncio.get_running_loop().time() + max(self.timeout, 1.0))
                self._epoch = str(reply[1])
                return
            except StoreError:
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))
                delay = min(delay * 2, 1.0)

    # -- plumbing ----------------------------------------------------------------------------

    def _pack(self, script: str, keys: Sequence[str], args: Sequence[Any]) -> bytes:
        return bytes(hiredis.pack_command(("EVALSHA", self._sha[script], len(keys), *keys, *args)))

    def _undo_command(self, uid: str, token: str) -> bytes:
        lay = self.layout
        return self._pack("undo", [lay.record(uid), lay.exp, lay.counts], [uid, token])

    def _reload_commands(self) -> list[bytes]:
        return [_packed("SCRIPT", "LOAD", self._sources[n]) for n in SCRIPTS]

    def _undone(self, uid: str, result: int) -> None:
        if result == 1:
            self.undone += 1
            log.warning("redis_unanswered_reserve_released", call=uid)
        else:
            self.handed_back += 1
            log.info("redis_unanswered_takeover_undone", call=uid)

    async def _script(self, script: str, keys: Sequence[str], args: Sequence[Any],
                      deadline: float | None = None) -> Any:
        return await self._pipe.call(self._pack(script, keys, args), deadline)

    async def _command(self, *cmd: Any) -> Any:
        return await self._pipe.call(_packed(*cmd))

    def _base(self, now: float) -> float:
        return float(now) + self._offset

    async def _catch_up(self, base: float, deadline: float) -> None:
        """Drop a batch of ended leases (one sweep at a time, shared by every waiting operation)."""
        task = self._catching
        if task is None or task.done():
            task = self._catching = asyncio.get_running_loop().create_task(self._drop_expired(base, deadline))
        await asyncio.shield(task)

    async def _drop_expired(self, base: float, deadline: float) -> None:
        lay = self.layout
        await self._script("sweep", [lay.exp, lay.counts, lay.reports],
                           [num(base), SWEEP_BATCH, 0, "", MAX_REPORTS, SWEEP_BUDGET_US], deadline)

    async def _counted(self, script: str, keys: list[str], args: list[Any], stale_at: int, now: float) -> Any:
        """Run a counter-reading script; sweep and retry while it says ended leases wait (-2).
        `args[stale_at]` is its "go ahead anyway" flag, set on the last try."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        deadline = start + self.budget
        base = self._base(now)
        for attempt in itertools.count():
            if _last_try(attempt, loop.time(), start, self.timeout):
                args[stale_at] = "1"
            reply = await self._script(script, keys, args, deadline)
            if not _is_stale(reply):
                return reply
            if args[stale_at] == "1":
                raise StoreError("redis: ended leases wait for a sweep")  # (cannot happen)
            await self._catch_up(base, deadline)
        raise AssertionError("unreachable")

    # -- operations --------------------------------------------------------------------------

    def reserve_command(self, call: CallInfo, plan: Sequence[PlanEntry], now: float, timeout: float,
                        token: str = "bench", rates: Sequence[RateEntry] = ()) -> tuple[list[str], list[Any]]:
        """KEYS and ARGV of reserve.lua for this call (the benchmark replays them)."""
        cmd = self._encoder.encode(call, plan, self._base(now), float(timeout), token, self._epoch or "", "", rates)
        return cmd.keys, cmd.args

    async def reserve(
        self, call: CallInfo, plan: Sequence[PlanEntry], now: float, timeout: float, token: str,
        force: bool = False, rates: Sequence[RateEntry] = (),
    ) -> ReserveResult:
        """Admit the call into every key of the plan and take a token of each rate, or do
        nothing (reserve.lua)."""
        if self._rebuilding and not force:
            raise StoreError(REBUILDING)
        pipe = self._pipe
        loop = pipe.loop
        if self.circuit.state != "up" or loop is None:
            pipe.errors += 1
            raise self.circuit.error()
        deadline = loop.time() + self.budget
        now, timeout = float(now), float(timeout)
        base = now + self._offset
        epoch = "" if force else (self._epoch or "")
        flags = "f" if force else ""
        cmd = self._encoder.encode(call, plan, base, timeout, token, epoch, flags, () if force else rates)
        head = ("EVALSHA", self._sha["reserve"], len(cmd.keys), *cmd.keys)
        undo = (call.uid, token)
        start = deadline - self.budget
        for attempt in itertools.count():
            last = _last_try(attempt, loop.time(), start, self.timeout)
            if last:
                cmd.args[9] = flags + "s"
            reply = await pipe.call(_packed(*head, *cmd.args), deadline, undo)
            try:
                status = reply[0]
            except (TypeError, IndexError):
                raise StoreError(f"unexpected reserve reply from redis: {reply!r}") from None
            if status != -2:
                break
            if last:
                raise StoreError("redis: this call's ended lease waits for a sweep")
            await self._catch_up(base, deadline)
        if status == -1:
            self._epoch_check(epoch, reply[1], "reserve")
            raise StoreError(REBUILDING)
        n = len(cmd.profiles)
        try:
            sizes = [int(reply[2 + slot]) for slot in cmd.slots]
            rate_blocked = None
            tokens: list[float] = []
            if cmd.rates and status in (0, 1):
                rb = int(reply[2 + n])
                rate_blocked = rb if rb >= 0 else None
                tokens = [float(t) for t in reply[3 + n:3 + n + cmd.rates]]
        except (TypeError, ValueError, IndexError) as exc:
            raise StoreError(f"unexpected reserve reply from redis: {exc!r}") from None
        if status == 1:
            rec = CallRecord(call.call_id, call.from_uri, call.to_uri, call.account, "early", now, None,
                             timeout, now + timeout, cmd.profiles, call.from_tag, call.node, token,
                             dict(call.vars) if call.vars else {})
            return ReserveResult(True, False, None, sizes, rec, False, None, tokens)
        if status == 0:
            blocked = int(reply[1])
            return ReserveResult(False, False, blocked if blocked >= 0 else None, sizes, None, False,
                                 rate_blocked, tokens)
        held = decode_record(reply[2 + n:], self._offset)
        if status == 2:
            return ReserveResult(True, True, None, sizes, held)
        return ReserveResult(False, False, None, sizes, held, True)

    async def _lease(self, uid: str, now: float, timeout: float, token: str | None, answer: bool) -> CallRecord | None:
        lay = self.layout
        base = self._base(now)
        reply = await self._script("lease", [lay.record(uid), lay.exp, lay.counts],
                                   [num(base), num(base + timeout), num(timeout), uid, token or "",
                                    "1" if answer else ""])
        return maybe_record(reply, self._offset)

    async def answer(self, uid: str, now: float, timeout: float, token: str | None = None) -> CallRecord | None:
        """Mark a held call answered with a new lease (lease.lua)."""
        return await self._lease(uid, now, timeout, token, True)

    async def refresh(self, uid: str, now: float, timeout: float, token: str | None = None) -> CallRecord | None:
        """Extend a held call's lease (lease.lua)."""
        return await self._lease(uid, now, timeout, token, False)

    async def end(self, uid: str, now: float, reason: str, token: str | None = None) -> CallRecord | None:
        """Release a held call (end.lua)."""
        lay = self.layout
        counter = "failed" if reason in FAILED_REASONS else "expired" if reason == "timeout" else ""
        reply = await self._script("end", [lay.record(uid), lay.exp, lay.counts],
                                   [num(self._base(now)), uid, counter, token or ""])
        return maybe_record(reply, self._offset)

    async def set_var(self, uid: str, name: str, value: str | None, now: float) -> CallRecord | None:
        """Set or delete one variable of a held call (set_var.lua)."""
        reply = await self._script("set_var", [self.layout.record(uid)],
                                   [num(self._base(now)), name, value or "", "1" if value is None else ""])
        return maybe_record(reply, self._offset)

    async def get_call(self, uid: str, now: float) -> CallRecord | None:
        """The record of a held call (HGETALL)."""
        return live_record(await self._command("HGETALL", self.layout.record(uid)), self._offset, now)

    async def profile_size(self, profile: str, value: str | None, now: float) -> int:
        """Calls in the key, or in any key of the profile: counters and ZCARDs, O(1) (size.lua)."""
        lay = self.layout
        if value is None:
            mode, arg = "profile", escape(profile)
        else:
            mode, arg = "value", "k:" + kid(profile, value)
        reply = await self._counted("size", [lay.counts, lay.exp, lay.key(profile, None)],
                                    [num(self._base(now)), mode, arg, ""], 3, now)
        if not isinstance(reply, int):
            raise StoreError(f"unexpected size reply from redis: {reply!r}")
        return reply

    async def stats(self, now: float) -> DialogStats:
        """Dialog statistics of every instance sharing this Redis and prefix (stats.lua)."""
        lay = self.layout
        reply = await self._counted("stats", [lay.counts, lay.exp], [num(self._base(now)), ""], 1, now)
        try:
            _, held, active, processed, expired, failed = (int(x) for x in reply)
        except (TypeError, ValueError) as exc:
            raise StoreError(f"unexpected stats reply from redis: {exc!r}") from None
        return DialogStats(active_dialogs=max(active, 0), early_dialogs=max(held - active, 0),
                           processed_dialogs=processed, expired_dialogs=expired, failed_dialogs=failed)

    async def _records(self, uids: Sequence[str], now: float) -> list[CallRecord | None]:
        """The live records of these calls (one pipelined round trip of HGETALLs)."""
        pipe = self._pipe
        lay = self.layout
        futs = [pipe.call(_packed("HGETALL", lay.record(uid))) for uid in uids]
        offset = self._offset
        return [live_record(await f, offset, now) for f in futs]

    async def _seq_page(self, zset: str, cursor: str, limit: int, now: float) -> Page:
        """A page of a zset of calls scored by admission seq (a key's or a node's calls)."""
        if cursor and not (cursor.startswith("s") and cursor[1:].isdigit()):
            raise StoreError(f"bad cursor {cursor!r}")
        limit = max(1, min(limit, MAX_PAGE))
        low = f"({cursor[1:]}" if cursor else "-inf"
        reply = await self._command("ZRANGEBYSCORE", zset, low, "+inf", "WITHSCORES", "LIMIT", 0, limit + 1)
        uids = reply[0::2]
        more = len(uids) > limit
        nxt = f"s{int(float(reply[2 * limit - 1]))}" if more else ""
        recs = await self._records(uids[:limit], now)
        return Page([r for r in recs if r is not None], nxt)

    async def profile_list(self, profile: str, value: str | None, now: float,
                           cursor: str = "", limit: int = MAX_PAGE) -> Page:
        """A page of the calls in the key, or in any key of the profile (walk.lua)."""
        lay = self.layout
        if value is not None:
            return await self._seq_page(lay.key(profile, value), cursor, limit, now)
        limit = max(1, min(limit, MAX_PAGE))
        if not cursor:
            stage, seq, val = "n", "", ""
        else:
            stage, rest = cursor[0], cursor[1:]
            seq, sep, val = rest.partition(":")
            if stage not in "nvw" or not sep or (seq and not seq.isdigit()):
                raise StoreError(f"bad cursor {cursor!r}")
        reply = await self._script("walk", [lay.key(profile, None), lay.values(profile)],
                                   [lay.value_key_base(profile), stage, seq, val, limit])
        if not isinstance(reply, list) or len(reply) < 3:
            raise StoreError(f"unexpected walk reply from redis: {reply!r}")
        nxt = f"{reply[0]}{reply[1]}:{reply[2]}" if reply[0] else ""
        uids, unders = reply[3::2], reply[4::2]
        recs = await self._records(uids, now)
        out: list[CallRecord] = []
        for rec, under in zip(recs, unders, strict=True):
            if rec is None:
                continue
            first = next((v for p, v in rec.profiles if p == profile), None)
            if (under == "-" and first is None) or (first is not None and under == "=" + first):
                out.append(rec)
        return Page(out, nxt)

    async def profile_values(self, profile: str, now: float, cursor: str = "", limit: int = MAX_PAGE) -> Page:
        """A page of (value, size) of the profile's non-empty values, in value order (values.lua)."""
        if cursor and not cursor.startswith("v"):
            raise StoreError(f"bad cursor {cursor!r}")
        lay = self.layout
        limit = max(1, min(limit, MAX_PAGE))
        start = "(" + cursor[1:] if cursor else "-"
        reply = await self._counted("values", [lay.values(profile), lay.exp, lay.counts],
                                    [num(self._base(now)), start, limit, "k:" + escape(profile) + "=", ""], 4, now)
        values, sizes = reply[2::2], reply[3::2]
        items = [(str(v), int(n)) for v, n in zip(values, sizes, strict=True)]
        nxt = "v" + str(values[-1]) if reply[1] and values else ""
        return Page(items, nxt)

    async def node_calls(self, node: str, now: float, cursor: str = "", limit: int = MAX_PAGE) -> Page:
        """A page of the calls admitted through `node`, in admission order."""
        return await self._seq_page(self.layout.node(node), cursor, limit, now)

    async def sweep(self, now: float) -> list[CallRecord]:
        """Drop every call whose lease ended by `now`; the expired calls no sweep reported yet
        (each exactly once across every instance), in batches (sweep.lua)."""
        lay = self.layout
        base = num(self._base(now))
        out: list[CallRecord] = []
        for _ in range(SWEEP_ROUNDS):
            epoch = "" if self._rebuilding else (self._epoch or "")
            reply = await self._script("sweep", [lay.exp, lay.counts, lay.reports],
                                       [base, SWEEP_BATCH, REPORT_BATCH, epoch, MAX_REPORTS, SWEEP_BUDGET_US])
            if not isinstance(reply, list) or not reply:
                raise StoreError(f"unexpected sweep reply from redis: {reply!r}")
            if reply[0] == -1:
                self._epoch_check(epoch, reply[1], "sweep")
                break
            reports = reply[2:]
            for r in reports:
                try:
                    out.append(decode_record(unpack_items(r), self._offset))
                except (StoreError, ValueError) as exc:
                    log.error("redis_bad_expiry_report", error=str(exc))
            if not reply[1] and len(reports) < REPORT_BATCH:
                break
        return out


def _packed(*cmd: Any) -> bytes:
    """One command in RESP (hiredis packs it in C)."""
    return bytes(hiredis.pack_command(cmd))


def _last_try(attempt: int, now: float, start: float, timeout: float) -> bool:
    """Whether this try of a counter-reading script must go ahead even if leases wait."""
    return attempt >= STALE_ROUNDS - 1 or (attempt > 0 and now - start > timeout / 2)


def _is_stale(reply: Any) -> bool:
    return reply == -2 or (isinstance(reply, list) and bool(reply) and reply[0] == -2)


__all__ = ["REBUILDING", "RedisStore", "script_source"]
