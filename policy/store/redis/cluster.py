"""The counter store on Redis Cluster: the store contract, with each profile key in its own slot.

The single-Redis store (`store.py`) admits a call with one atomic script over every key of its
plan; a cluster cannot run one script over several slots, so a check here is a short sequence
of atomic steps, each on one slot, in one fixed order (docs/redis.md, "Redis Cluster"):

1. **begin**, in the call's shard (`cluster_layout`), sent with a look at the size of each key
   with a limit that refused a call lately: a held call answers duplicate or conflict and nothing
   else happens; a key already full refuses the call before it takes any place; otherwise a
   *pending* record locks the call's identity and lists every key the reserve may touch.
2. **steps**, one per profile key: an atomic check-and-add of (uid, lease) on that key
   (`cluster_step.lua`; the steps, removals and looks of one event-loop tick are coalesced per
   key by `cluster_batch`). Counting-only keys (no enforced limit) cannot refuse: they go
   together with the first key that has a limit; keys with limits go one after the other in one
   global order (slot, then name), each refusing when full. On the first full key the steps
   already taken are rolled back and the call is denied: never a call over a limit. A call
   refused at a step (the key filled up after its look) is tried once more from the begin.
3. **commit**, in the call's shard: the pending record becomes a held call, counted in the
   shard's counters and indexes.

Call rates are steps too: each bucket is a key of its own (`cluster_rate.lua`); an enforced
rate's take goes in the global order with the keys that have a limit (refusing when the bucket
has no whole token), a shadow rate's with the counting-only keys. A take leaves a *hold* in the
bucket: the commit is followed by its settle (the token stays taken); a call that is not
admitted refunds it - at once when a later step refuses or the reserve is rolled back, by the
undo, or by the sweep that takes a crashed reserve's pending record over (its `r` lists the
buckets). The hold bounds the refund: a token comes back only as far as the bucket is known to
lack it, so a late refund never mints one (docs/redis.md, "Call rates").

A refusal after an earlier limit key gave the call its last place is counted in
`cross_slot_conflicts`: while this call held that place for a moment, another call that needed
it may have been refused although one atomic step would have admitted it (two calls racing for
the last places of two keys). A crash between steps leaves a pending record (its lock ends after
`LOCK_LEASE`, then a sweep releases what it lists) and entries with the call's lease (each key
drops them when the lease ends); a lost write (a failover) is repaired by `repair` and
reconciliation.

Ends, answers and sweeps are steps too: the shard first (the call leaves the shard's counters
and stays as an *ending* record that locks it), then the profile keys, then the record goes.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import os
import random
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from importlib import resources
from typing import TYPE_CHECKING, Any, NamedTuple

import hiredis
import orjson
import structlog

from policy.clock import Clock
from policy.errors import StoreError
from policy.plan import RateEntry
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
from policy.store.redis.cluster_batch import KeyBatcher
from policy.store.redis.cluster_layout import SHARDS, ClusterLayout, Shard, node_member, node_prefix
from policy.store.redis.cluster_map import SCHEME, ClusterMap, NodeLink, parse_cluster_url, parse_seeds
from policy.store.redis.codec import decode_record, maybe_record, num, pack_items, unpack_items
from policy.store.redis.connection import ReplyError, RespConnection, parse_target, roundtrip
from policy.store.redis.keys import escape
from policy.store.redis.keys import kid as rate_id
from policy.store.redis.pipe import budget_of

if TYPE_CHECKING:
    from policy.settings import Settings

log = structlog.get_logger("policy.store.redis")

SCRIPTS = ("cluster_begin", "cluster_step", "cluster_commit", "cluster_release", "cluster_finish",
           "cluster_lease", "cluster_set_var", "cluster_expire", "cluster_counts", "cluster_page",
           "cluster_lock", "cluster_rate", "epoch")
#: What `reserve` raises while the store rebuilds after a data loss or a failover.
REBUILDING = "redis cluster lost data or failed over; repairing and rebuilding from the proxies"
#: Seconds a multi-step operation (reserve, end, sweep, repair) may hold a call's lock; after
#: that a sweep takes the operation over (its owner is presumed dead).
LOCK_LEASE = 10.0
#: A key that refused a call is looked at before each reserve that needs it for this long
#: (seconds; at most FULL_KEYS keys remembered).
FULL_MEMORY = 10.0
FULL_KEYS = 10_000
#: Pause before asking again when another operation holds the call (within the deadline).
BUSY_PAUSE = 0.002
#: Tries of a reserve or counter read while ended leases wait for a sweep.
STALE_ROUNDS = 20
#: Calls one sweep script handles at most per shard, reports it hands out at most.
SWEEP_BATCH = 100
REPORT_BATCH = 500
SWEEP_ROUNDS = 20
MAX_REPORTS = 100_000
#: Calls locked together by one repair script.
REPAIR_BATCH = 500
#: Tries of the `on_data_loss` callback before the store trusts its counts regardless.
REBUILD_ATTEMPTS = 3
#: The clock offset is rounded to this (2**-10 s), so `now + offset - offset == now` holds.
OFFSET_QUANTUM = 1.0 / 1024
#: Background releases (rollbacks, undos, unfinished ends) are retried this long at most, then
#: left to the sweeps (which take ended locks over).
RETRY_FOR = LOCK_LEASE / 2
#: Seconds a token a reserve took stays a *hold* (refundable) if neither settled nor refunded:
#: longer than a pending record's lock plus a sweep's takeover, so a crashed reserve's tokens
#: are refunded by the sweep that releases it. An expired hold counts as settled (kept taken).
HOLD_LEASE = 3 * LOCK_LEASE
#: Milliseconds added to a bucket's time to full in its PEXPIRE (Redis's clock vs cluster time).
RATE_SLACK_MS = 1000

_HELD = ("early", "active")


#: Shard scripts sent for several calls at once (one event-loop tick, one shard: cluster_batch).
MULTI = ("cluster_begin", "cluster_commit", "cluster_release")
#: How such a script runs each call: its body becomes a function of (KEYS, ARGV).
MULTI_DRIVER = """
-- several calls in one script (cluster_batch.py): KEYS holds the keys of every call, one after
-- the other; ARGV holds per call its number of keys, its number of arguments, its arguments.
-- Returns the reply of each call, in order.
local out, ki, ai = {}, 1, 1
while ai <= #ARGV do
  local nk, na = tonumber(ARGV[ai]), tonumber(ARGV[ai + 1])
  local keys, args = {}, {}
  for j = 1, nk do
    keys[j] = KEYS[ki + j - 1]
  end
  for j = 1, na do
    args[j] = ARGV[ai + 1 + j]
  end
  ki, ai = ki + nk, ai + 2 + na
  out[#out + 1] = one(keys, args)
end
return out
"""


def cluster_script_source(name: str) -> str:
    """The text Redis runs for a cluster script: the shared helpers, then the script (a script of
    MULTI wrapped to run several calls: each call's reply is one element of its reply)."""
    base = resources.files("policy.store.redis") / "lua"
    body = (base / f"{name}.lua").read_text(encoding="utf-8")
    if name == "epoch":
        return body
    lib = "\n".join((base / f).read_text(encoding="utf-8") for f in ("_codec.lua", "_cluster_lib.lua"))
    if name in MULTI:
        return lib + "\nlocal function one(KEYS, ARGV)\n" + body + "\nend\n" + MULTI_DRIVER
    return lib + "\n" + body


def is_cluster_url(url: str) -> bool:
    """Whether a store URL names a Redis Cluster."""
    return url.startswith(SCHEME)


class _Key:
    """What a reserve needs about one profile key (cached per (profile, value))."""

    __slots__ = ("eprofile", "kid", "name", "piece", "slot", "valued")

    def __init__(self, layout: ClusterLayout, profile: str, value: str | None) -> None:
        self.name, self.slot, self.kid = layout.key(profile, value)
        self.eprofile = escape(profile)
        self.valued = value is not None
        self.piece = f"{len(self.kid.encode())}:{self.kid}"


class _Plan:
    """A plan as the cluster reserve runs it."""

    __slots__ = ("counting", "fields", "keys", "limited", "limits", "profiles", "slots", "valued")

    def __init__(self, keys: list[_Key], limits: list[int | None], slots: list[int],
                 profiles: list[tuple[str, str | None]], fields: list[str]) -> None:
        self.keys = keys  # distinct keys, in plan order
        self.limits = limits  # per key: the smallest enforced limit on it, or None
        self.slots = slots  # per plan entry: the index of its key in `keys`
        self.profiles = profiles
        self.fields = fields  # the shard counters the call adds to ('p:'/'x:')
        self.valued = [k.kid for k in keys if k.valued]
        self.counting = [i for i, lim in enumerate(limits) if lim is None]
        # keys with a limit, in the one global order: slot, then name
        self.limited = sorted((i for i, lim in enumerate(limits) if lim is not None),
                              key=lambda i: (keys[i].slot, keys[i].name))


class _Bucket(NamedTuple):
    """A call rate as the cluster reserve runs it: its bucket's key and the rate."""

    name: str
    slot: int
    rid: str
    entry: RateEntry


def _bucket_tokens(reply: Any, entry: RateEntry, base: float) -> float:
    """A bucket's tokens at `base` from its (t, ts), as cluster_rate.lua refills them (a missing
    bucket is full)."""
    t, ts = reply
    burst = float(entry.burst)
    if t is None:
        return burst
    t, ts = float(t), float(ts)
    if base > ts:
        return min(burst, t + (base - ts) * entry.rate)
    return min(burst, t)


class RedisClusterStore(CounterStore):
    """Dialog-profile counters on a Redis Cluster; see the module docstring."""

    name = "redis-cluster"

    def __init__(
        self,
        seeds: Sequence[str] | str,
        *,
        prefix: str = "callpolicy",
        timeout: float = 0.05,
        connect_timeout: float = 1.0,
        username: str | None = None,
        password: str | None = None,
        clock: Clock | None = None,
    ) -> None:
        if not timeout > 0:
            raise StoreError(f"redis store timeout must be > 0, not {timeout!r}")
        if not connect_timeout > 0:
            raise StoreError(f"redis store connect_timeout must be > 0, not {connect_timeout!r}")
        if isinstance(seeds, str):
            hosts, user, pw = parse_cluster_url(seeds)
            username = username or user
            password = password if password is not None else pw
            self.url = seeds
        else:
            hosts = parse_seeds(seeds)
            self.url = SCHEME + ",".join(f"{h}:{p}" for h, p in hosts)
        self.prefix = prefix
        self.layout = ClusterLayout(prefix)
        self.timeout = timeout
        self.budget = budget_of(timeout)  # what an operation may wait for Redis (pipe.py)
        self.connect_timeout = connect_timeout
        self.clock = clock
        self._sources = {name: cluster_script_source(name) for name in SCRIPTS}
        self._sha = {name: hashlib.sha1(src.encode()).hexdigest() for name, src in self._sources.items()}
        self._map = ClusterMap(hosts, username=username, password=password, timeout=timeout,
                               connect_timeout=connect_timeout, log=log, prepare=self._prepare,
                               reload_commands=self._reload_commands, on_change=self._map_changed)
        self._keys: dict[tuple[str, str | None], _Key] = {}
        self._batch = KeyBatcher(self._map, lambda: self._sha["cluster_step"], lambda: self._sha["cluster_finish"],
                                 lambda: self._sha["cluster_rate"], HOLD_LEASE, RATE_SLACK_MS)
        self._bucket_names: dict[tuple[str, str | None], tuple[str, int, str]] = {}
        self._full: dict[str, float] = {}  # key name -> until when it is looked at (loop time)
        self._offset = 0.0
        self._reference: NodeLink | None = None  # the primary whose TIME is cluster time
        self._epochs: list[str | None] = [None] * SHARDS
        self._rebuilding = False
        self._again = False
        self._lost_all = False  # a data loss (not only a failover) waits for a rebuild
        self._rebuild_task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._catching: dict[int, asyncio.Task[Any]] = {}
        self._id = os.urandom(4).hex()
        self._ops = itertools.count(1)
        self.closed = False
        #: Awaited after a data loss or a failover, once the store repaired itself (the server
        #: sets it to reconcile with every proxy).
        self.on_data_loss: Callable[[], Awaitable[None]] | None = None
        # counters
        self.data_losses = 0
        self.rebuilds = 0
        self.rebuild_seconds: float | None = None
        self.last_repair: dict[str, Any] | None = None
        self.cross_slot_conflicts = 0
        self.refused = 0
        self.retried = 0
        self.rollbacks = 0
        self.undone = 0
        self.handed_back = 0
        self.busy_waits = 0
        self.unfinished = 0  # background releases given up (left to the sweeps)
        self.refunded = 0  # tokens given back (reserves whose call was not admitted)

    @classmethod
    def from_settings(cls, settings: Settings, clock: Clock | None = None) -> RedisClusterStore:
        """The store service.toml asks for (a redis+cluster:// URL, or `cluster = [...]`)."""
        store = settings.store
        seeds: Sequence[str] | str = store if is_cluster_url(store) else list(settings.redis_cluster)
        username = password = None
        if not isinstance(seeds, str):  # the credentials of `url` (its host is not used)
            target = parse_target(settings.redis_url)
            username, password = target.username, target.password
        return cls(seeds, prefix=settings.redis_prefix, timeout=settings.store_timeout,
                   connect_timeout=settings.store_connect_timeout, username=username, password=password,
                   clock=clock)

    # -- health ---------------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        """Health for `stats` and metrics (no I/O)."""
        state = self._map.state()
        links = list(self._map.links.values())
        up = sum(1 for link in links if link.up)
        covered = state["slots_covered"]
        if self._rebuilding:
            overall = "rebuilding"
        elif links and up == len(links) and covered == 16384:
            overall = "up"
        elif up:
            overall = "degraded"
        else:
            overall = "down"
        return {
            "state": overall,
            "mode": "cluster",
            "prefix": self.prefix,
            "shards": SHARDS,
            "clock_offset": self._offset,
            "clock_reference": str(self._reference) if self._reference else None,
            "rebuilding": self._rebuilding,
            "data_losses": self.data_losses,
            "rebuilds": self.rebuilds,
            "last_rebuild_seconds": self.rebuild_seconds,
            "last_repair": self.last_repair,
            "cross_slot_conflicts": self.cross_slot_conflicts,
            "refused": self.refused,
            "retried": self.retried,
            "rollbacks": self.rollbacks,
            "undone": self.undone,
            "handed_back": self.handed_back,
            "busy_waits": self.busy_waits,
            "unfinished": self.unfinished,
            "refunded": self.refunded,
            "errors": sum(link.pipe.errors for link in links),
            "ops": sum(link.pipe.ops for link in links),
            "batches": sum(link.pipe.batches for link in links),
            **state,
        }

    @property
    def errors(self) -> int:
        """Operations that failed on any primary."""
        return sum(link.pipe.errors for link in self._map.links.values())

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Find the primaries, connect (bounded). A cluster that is down is not fatal."""
        self.closed = False
        if not await self._map.start():
            log.warning("redis_cluster_unavailable_at_start", seeds=self.url, error=self._map.last_error)

    async def close(self) -> None:
        """Stop background work, fail what waits, disconnect."""
        self.closed = True
        tasks = [t for t in (self._rebuild_task, *self._tasks, *self._catching.values()) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()
        self._catching.clear()
        self._rebuild_task = None
        await self._batch.close()
        await self._map.close()

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _prepare(self, link: NodeLink, conn: RespConnection) -> None:
        """On each new connection to a primary (ROLE checked): scripts, clock, epochs."""
        replies = await roundtrip(conn, [("SCRIPT", "LOAD", self._sources[n]) for n in SCRIPTS])
        for name, sha in zip(SCRIPTS, replies, strict=True):
            if isinstance(sha, ReplyError) or sha != self._sha[name]:
                raise StoreError(f"redis {link} did not load script {name}: {sha}")
        if self._map.slots[self.layout.shards[0].slot] is link:
            await self._measure(link, conn)
        mine = [sh for sh in self.layout.shards if self._map.slots[sh.slot] is link]
        if mine:
            await self._epochs_on(conn, mine, str(link))

    async def _measure(self, link: NodeLink, conn: RespConnection | None = None) -> None:
        """The offset of cluster time (the reference primary's TIME) to our clock."""
        self._reference = link
        if self.clock is None:
            return
        t0 = self.clock.now()
        if conn is not None:
            (when,) = await roundtrip(conn, [("TIME",)])
        else:
            when = await link.pipe.call(_packed("TIME"), asyncio.get_running_loop().time() + 1.0)
        t1 = self.clock.now()
        if isinstance(when, ReplyError):
            raise StoreError(f"redis {link} refused TIME: {when}")
        now = int(when[0]) + int(when[1]) / 1e6
        offset = round((now - (t0 + t1) / 2) / OFFSET_QUANTUM) * OFFSET_QUANTUM
        if abs(offset - self._offset) > 1.0 and self._offset:
            log.warning("redis_clock_offset_changed", reference=str(link), was=self._offset, now=offset)
        elif not self._offset:
            log.info("redis_clock_offset", reference=str(link), offset=offset)
        self._offset = offset

    async def _epochs_on(self, conn: RespConnection | None, shards: Sequence[Shard], where: str) -> None:
        """Adopt (or create) the data-loss marker of each shard; a marker that is gone or changed
        means its primary lost its data."""
        cmds = [("EVALSHA", self._sha["epoch"], 1, sh.counts, os.urandom(8).hex()) for sh in shards]
        if conn is not None:
            replies = await roundtrip(conn, cmds)
        else:
            loop = asyncio.get_running_loop()
            futs = [self._map.send(sh.slot, _packed(*c), loop.time() + 1.0) for sh, c in zip(shards, cmds,
                                                                                              strict=True)]
            replies = [await f for f in futs]
        lost = []
        for sh, reply in zip(shards, replies, strict=True):
            if isinstance(reply, ReplyError):
                raise StoreError(f"redis {where} refused the epoch: {reply}")
            created, marker = int(reply[0]), str(reply[1])
            trusted = self._epochs[sh.index]
            if trusted is not None and marker != trusted:
                lost.append(sh.index)
            self._epochs[sh.index] = marker
            del created
        if lost:
            self._data_lost(f"{where}: the epoch markers of shards {lost} are gone or changed")

    def _reload_commands(self) -> list[bytes]:
        return [_packed("SCRIPT", "LOAD", self._sources[n]) for n in SCRIPTS]

    def _map_changed(self, failover: bool, why: str) -> None:
        if self.closed:
            return
        if failover:
            self._start_rebuild("failover: a replica took over slots; writes its old primary acknowledged "
                                "may be missing")
        self._spawn(self._after_map_change())

    async def _after_map_change(self) -> None:
        """Check the epochs of every shard and the clock reference on the new map."""
        await asyncio.sleep(0)
        ref = self._map.slots[self.layout.shards[0].slot]
        try:
            if ref is not None and ref is not self._reference and ref.up:
                await self._measure(ref)
            by_link: dict[NodeLink, list[Shard]] = {}
            for sh in self.layout.shards:
                link = self._map.slots[sh.slot]
                if link is not None and link.up:
                    by_link.setdefault(link, []).append(sh)
            for link, shards in by_link.items():
                await self._epochs_on(None, shards, str(link))
        except StoreError as exc:
            log.info("redis_cluster_check_deferred", error=str(exc))

    # -- data loss, failover, repair ----------------------------------------------------------

    def _epoch_check(self, shard: Shard, sent: str, current: Any, where: str) -> None:
        if sent and sent == self._epochs[shard.index]:
            self._data_lost(f"{where}: the epoch marker of shard {shard.index} is "
                            f"{'gone' if not current else 'changed'}")

    def _data_lost(self, how: str) -> None:
        self.data_losses += 1
        self._lost_all = True
        log.error("redis_data_lost", mode="cluster", prefix=self.prefix, detected=how, losses=self.data_losses,
                  rebuild="repair and reconciliation" if self.on_data_loss else "repair")
        self._start_rebuild(how)

    def _start_rebuild(self, why: str) -> None:
        if self._rebuilding:
            self._again = True
            return
        self._rebuilding = True
        self._again = False
        self.rebuilds += 1
        log.warning("redis_cluster_rebuilding", reason=why)
        self._rebuild_task = asyncio.get_running_loop().create_task(self._rebuild())

    async def _rebuild(self) -> None:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        try:
            while True:
                self._again = False
                await self._whole()
                for sh in self.layout.shards:  # markers lost with their primary: write new ones, trust them
                    self._epochs[sh.index] = None
                await self._retry(lambda: self._epochs_on(None, self.layout.shards, "rebuild"))
                # the keys a lost write can have touched: the failed-over slots, or all after a data loss
                slots = None if self._lost_all else set(self._map.failover_slots)
                self._lost_all = False
                self._map.failover_slots.clear()
                self.last_repair = await self._retry(lambda s=slots: self.reassert(self._now(), s))  # type: ignore[misc]
                if self.on_data_loss is not None:
                    for attempt in range(1, REBUILD_ATTEMPTS + 1):
                        try:
                            await self.on_data_loss()
                            break
                        except Exception as exc:
                            log.error("redis_rebuild_failed", attempt=attempt, error=f"{type(exc).__name__}: {exc}")
                            await asyncio.sleep(min(0.5 * 2 ** attempt, 5.0))
                if not self._again:
                    break
            log.warning("redis_rebuilt", mode="cluster", seconds=round(loop.time() - t0, 3),
                        repair=self.last_repair, reconciled=self.on_data_loss is not None)
        finally:
            self.rebuild_seconds = round(loop.time() - t0, 3)
            self._rebuilding = False
        # over-counts only (entries of calls that are gone): checks need not wait for these
        self._spawn(self._orphans_after_rebuild())

    async def _orphans_after_rebuild(self) -> None:
        with contextlib.suppress(StoreError):
            report = await self.remove_orphans(self._now())
            if self.last_repair is not None:
                self.last_repair.update(report)

    async def _whole(self) -> None:
        """Until every slot has a primary we are connected to."""
        while True:
            slots = self._map.slots
            if all(link is not None and link.up for link in slots):
                return
            self._map.request_refresh()
            await asyncio.sleep(0.05)

    async def _retry(self, fn: Callable[[], Awaitable[Any]]) -> Any:
        delay = 0.05
        while True:
            try:
                return await fn()
            except StoreError as exc:
                log.info("redis_cluster_repair_retry", error=str(exc))
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))
                delay = min(delay * 2, 1.0)
                await self._whole()

    async def repair(self, now: float) -> dict[str, Any]:
        """Make every profile key agree with the call records (after a failover or data loss):
        `reassert`, then `remove_orphans`. Other instances keep running meanwhile."""
        report = await self.reassert(now)
        report.update(await self.remove_orphans(now))
        return report

    async def reassert(self, now: float, slots: set[int] | None = None) -> dict[str, Any]:
        """Put every held call back into every key its record lists (entries a lost write took
        away: an under-count, so checks wait for this); with `slots`, only into the keys in those
        slots (the ones a failover may have lost writes of). Each call is locked while it is put
        back, so reserves, ends and sweeps of it wait (briefly) and nothing in flight is touched."""
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        base = float(now) + self._offset
        owner = self._owner()
        lock = num(base + LOCK_LEASE)
        deadline = loop.time() + 30.0
        report: dict[str, Any] = {"calls": 0, "entries_restored": 0}

        async def shard(sh: Shard) -> None:
            cursor = "0"
            while True:
                reply = await self._map.call(sh.slot, _packed("ZSCAN", sh.exp, cursor, "COUNT", REPAIR_BATCH),
                                             deadline)
                cursor, flat = str(reply[0]), reply[1]
                uids = list(dict.fromkeys(flat[0::2]))
                if uids:
                    got = await self._lock(sh, uids, base, lock, owner, False, deadline)
                    locked = [u for u, (state, _) in got.items() if state == "held"]
                    by_key: dict[str, tuple[int, list[str]]] = {}
                    for uid in locked:
                        expires, _, k = got[uid][1].partition(" ")
                        for kid in unpack_items(k)[1:]:
                            name, slot = self.layout.key_of_kid(kid)
                            if slots is None or slot in slots:
                                by_key.setdefault(name, (slot, []))[1].extend((expires, uid))
                    cmds = [(slot, _packed("ZADD", name, "CH", *members)) for name, (slot, members) in by_key.items()]
                    for changed in await self._all(cmds, deadline):
                        report["entries_restored"] += int(changed)
                    report["calls"] += len(locked)
                    await self._finish(sh, locked, owner, deadline)
                if cursor == "0":
                    break

        await asyncio.gather(*(shard(sh) for sh in self.layout.shards))
        report["reassert_seconds"] = round(loop.time() - t0, 3)
        return report

    async def remove_orphans(self, now: float) -> dict[str, Any]:
        """Remove every entry whose call has no record, or a record that does not list that key
        (an over-count: checks need not wait for this). Entries of held calls that list their
        key are recognised by a plain read; only the others are locked (a placeholder lock when
        there is no record) and looked at again before they go."""
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        base = float(now) + self._offset
        owner = self._owner()
        lock = num(base + LOCK_LEASE)
        deadline = loop.time() + 60.0
        report: dict[str, Any] = {"keys": 0, "orphans_removed": 0}
        found: dict[str, dict[str, set[str]]] = {}  # uid -> kid -> key names

        async def scan(link: NodeLink) -> None:
            cursor = "0"
            while True:
                reply = await link.pipe.call(_packed("SCAN", cursor, "MATCH", self.layout.key_pattern,
                                                     "COUNT", 1000), deadline)
                cursor, names = str(reply[0]), reply[1]
                report["keys"] += len(names)
                pages = [(name, link.pipe.call(_packed("ZRANGEBYSCORE", name, f"({num(base)}", "+inf"), deadline))
                         for name in names]
                for name, fut in pages:
                    kid = name[len(self.layout.prefix) + 3:]
                    for uid in await fut:
                        found.setdefault(uid, {}).setdefault(kid, set()).add(name)
                if cursor == "0":
                    break

        await asyncio.gather(*(scan(link) for link in list(self._map.links.values())))
        uids = list(found)
        suspects: list[str] = []
        for i in range(0, len(uids), 2000):  # a plain read first: almost every entry is right
            part = uids[i:i + 2000]
            cmds = []
            for uid in part:
                sh = self.layout.shard(uid)
                cmds.append((sh.slot, _packed("HMGET", sh.record(uid), "s", "k")))
            for uid, (state, k) in zip(part, await self._all(cmds, deadline), strict=True):
                if state not in _HELD or not set(found[uid]) <= set(unpack_items(k or "")[1:]):
                    suspects.append(uid)
        by_shard: dict[int, list[str]] = {}
        for uid in suspects:
            by_shard.setdefault(self.layout.shard(uid).index, []).append(uid)
        for index, batch_uids in by_shard.items():
            sh = self.layout.shards[index]
            for i in range(0, len(batch_uids), REPAIR_BATCH):
                batch = batch_uids[i:i + REPAIR_BATCH]
                got = await self._lock(sh, batch, base, lock, owner, True, deadline)
                removals: list[tuple[int, bytes]] = []
                for uid in batch:
                    state, data = got[uid]
                    if state == "busy":
                        continue
                    listed = set(unpack_items(data.partition(" ")[2])[1:]) if state == "held" else set()
                    for kid, names in found[uid].items():
                        if kid not in listed:
                            removals += [(self.layout.key_of_kid(kid)[1], _packed("ZREM", n, uid)) for n in names]
                for removed in await self._all(removals, deadline):
                    report["orphans_removed"] += int(removed)
                await self._finish(sh, [u for u in batch if got[u][0] != "busy"], owner, deadline)
        report["orphans_seconds"] = round(loop.time() - t0, 3)
        log.info("redis_cluster_orphans_removed", **report)
        return report

    async def _lock(self, sh: Shard, uids: list[str], base: float, lock: str, owner: str, absent: bool,
                    deadline: float) -> dict[str, tuple[str, str]]:
        reply = await self._map.call(sh.slot, self._pack("cluster_lock", [sh.locks, *(sh.record(u) for u in uids)],
                                                         [num(base), lock, owner, "1" if absent else "", *uids]),
                                     deadline)
        return {uid: (str(reply[2 * i]), str(reply[2 * i + 1])) for i, uid in enumerate(uids)}

    async def _finish(self, sh: Shard, uids: Sequence[str], owner: str, deadline: float | None) -> None:
        """cluster_finish for these calls of one owner (coalesced per shard and tick)."""
        futs = [self._batch.finish(sh.slot, sh.locks, sh.record(uid), uid, owner) for uid in uids]
        await _every(futs)

    async def _all(self, cmds: Sequence[tuple[int, bytes]], deadline: float | None) -> list[Any]:
        """Send commands (slot, packed) at once, then wait for every reply (redirects followed)."""
        futs = [(slot, data, self._send(slot, data, deadline)) for slot, data in cmds]
        out = []
        failed: StoreError | None = None
        for slot, data, fut in futs:
            try:
                if isinstance(fut, StoreError):
                    raise fut
                out.append(await fut)
            except StoreError as exc:
                try:
                    out.append(await self._map.recover(exc, slot, data, deadline))
                except StoreError as again:
                    failed = failed or again
        if failed is not None:
            raise failed
        return out

    # -- plumbing -----------------------------------------------------------------------------

    def _now(self) -> float:
        return self.clock.now() if self.clock is not None else time.time()

    def _owner(self) -> str:
        return f"{self._id}.{next(self._ops)}"

    def _pack(self, script: str, keys: Sequence[str], args: Sequence[Any]) -> bytes:
        return bytes(hiredis.pack_command(("EVALSHA", self._sha[script], len(keys), *keys, *args)))

    def _key(self, profile: str, value: str | None) -> _Key:
        k = (profile, value)
        got = self._keys.get(k)
        if got is None:
            if len(self._keys) >= 50_000:
                self._keys.clear()
            got = self._keys[k] = _Key(self.layout, profile, value)
        return got

    def _plan(self, plan: Sequence[PlanEntry]) -> _Plan:
        distinct: dict[tuple[str, str | None], int] = {}
        keys: list[_Key] = []
        limits: list[int | None] = []
        slots: list[int] = []
        for e in plan:
            k = (e.profile, e.value)
            at = distinct.get(k)
            if at is None:
                at = distinct[k] = len(keys)
                keys.append(self._key(e.profile, e.value))
                limits.append(None)
            slots.append(at)
            if e.limit is not None and not e.shadow:
                cur = limits[at]
                limits[at] = e.limit if cur is None else min(cur, e.limit)
        valued: dict[str, bool] = {}
        for key in keys:
            if key.valued:
                valued.setdefault(key.eprofile, False)
        if valued:
            for key in keys:
                if not key.valued and key.eprofile in valued:
                    valued[key.eprofile] = True
        fields = ["p:" + ep for ep in valued] + ["x:" + ep for ep, both in valued.items() if both]
        return _Plan(keys, limits, slots, list(distinct), fields)

    async def _call(self, slot: int, data: bytes, deadline: float | None) -> Any:
        return await self._map.call(slot, data, deadline)

    async def _reply(self, slot: int, data: bytes, fut: asyncio.Future[Any] | StoreError,
                     deadline: float | None) -> Any:
        try:
            if isinstance(fut, StoreError):
                raise fut
            return await fut
        except StoreError as exc:
            return await self._map.recover(exc, slot, data, deadline)

    def _send(self, slot: int, data: bytes, deadline: float | None) -> asyncio.Future[Any] | StoreError:
        """A command's future (its error marked as seen: a caller that stops at an earlier failure
        leaves it unread), or the error that kept it from being sent."""
        try:
            fut = self._map.send(slot, data, deadline)
        except StoreError as exc:
            return exc
        fut.add_done_callback(_consume)
        return fut

    def _base(self, now: float) -> float:
        return float(now) + self._offset

    def _trusted(self, shard: Shard, force: bool) -> str:
        if force:
            return ""
        epoch = self._epochs[shard.index]
        if epoch is None:
            raise StoreError(f"redis cluster: shard {shard.index}'s primary has not been reached yet")
        return epoch

    # -- reserve ------------------------------------------------------------------------------

    async def reserve(
        self, call: CallInfo, plan: Sequence[PlanEntry], now: float, timeout: float, token: str,
        force: bool = False, rates: Sequence[RateEntry] = (),
    ) -> ReserveResult:
        """Admit the call into every key of the plan and take a token of each rate, or do
        neither: begin, steps, commit. A call refused at a step (the key filled up or the bucket
        emptied after its look: other reserves in flight held its places or tokens) is tried once
        more, from the begin, if the deadline allows."""
        if self._rebuilding and not force:
            raise StoreError(REBUILDING)
        loop = asyncio.get_running_loop()
        start = loop.time()
        deadline = start + self.budget
        buckets = self._buckets(rates) if rates and not force else []
        res = await self._attempt(call, plan, now, timeout, token, force, start, deadline, True, buckets)
        if res is None:
            self.retried += 1
            res = await self._attempt(call, plan, now, timeout, token, force, start, deadline, False, buckets)
        assert res is not None
        return res

    async def _attempt(self, call: CallInfo, plan: Sequence[PlanEntry], now: float, timeout: float, token: str,
                       force: bool, start: float, deadline: float, may_retry: bool,
                       rs: list[_Bucket]) -> ReserveResult | None:
        loop = asyncio.get_running_loop()
        now, timeout = float(now), float(timeout)
        base = now + self._offset
        lease = num(base + timeout)
        p = self._plan(plan)
        uid = call.uid
        sh = self.layout.shard(uid)
        epoch = self._trusted(sh, force)
        owner = self._owner()
        w = orjson.dumps([call.account, call.from_uri, call.to_uri])[:-1] + b","
        d = w + orjson.dumps([call.call_id, call.from_tag, call.node, base, p.profiles])[1:]
        k = pack_items([call.node, *(key.kid for key in p.keys)])
        holds = [(b.name, b.slot, f"{owner}/{j}") for j, b in enumerate(rs)]  # (a hold id per bucket)
        r = pack_items([owner, *(b.rid for b in rs)]) if rs else ""
        begin_keys = [sh.record(uid), sh.locks, sh.counts]
        begin_args = [num(base), uid, token, d, w, k, lease, num(timeout), num(base + LOCK_LEASE), owner, epoch, r]
        # with the begin, a look at the size of the keys with a limit that refused a call lately
        # and at the tokens of the enforced rates that did (all of them on the second try): a key
        # already full or a bucket already empty refuses the call before it takes any place or
        # token, so it never holds another key's last place (or a bucket's last token) for
        # nothing; keys and buckets with room, by far the most, cost no look
        batch = self._batch
        enforced = [j for j, b in enumerate(rs) if not b.entry.shadow]
        if force:
            looked: list[int] = []
            rlooked: list[int] = []
        elif may_retry:
            recent = self._full
            looked = [i for i in p.limited if recent.get(p.keys[i].name, 0.0) > start] if recent else []
            rlooked = [j for j in enforced if recent.get(rs[j].name, 0.0) > start] if recent else []
        else:
            looked = p.limited
            rlooked = enforced
        for attempt in itertools.count():
            self._usable(sh.slot)  # (else it is never sent: nothing to take back)
            peeks = [batch.look(p.keys[i].name, p.keys[i].slot, base) for i in looked]
            rpeeks = [batch.rate_look(rs[j].name, rs[j].slot) for j in rlooked]
            try:
                reply = await self._shard("cluster_begin", sh.slot, begin_keys, begin_args)
            except BaseException:  # it may have run: take its pending record back
                self._spawn(self._undo(sh, uid, token, owner, []))
                raise
            status = reply[0]
            if status == 1:
                break
            if status == 4:
                self.busy_waits += 1
                if loop.time() + BUSY_PAUSE >= deadline:
                    raise StoreError("redis cluster: another operation holds this call")
                await asyncio.sleep(BUSY_PAUSE)
                continue
            if status == -2:
                if attempt >= STALE_ROUNDS or loop.time() - start > self.timeout / 2:
                    raise StoreError("redis cluster: this call's ended lease waits for a sweep")
                await self._catch_up(sh, base, deadline)
                continue
            if status == -1:
                self._epoch_check(sh, epoch, reply[1], "reserve")
                raise StoreError(REBUILDING)
            held = decode_record(reply[1:], self._offset)
            current = await self._look_all(p, base, [], [])
            if status == 2:
                return ReserveResult(True, True, None, [current[i] for i in p.slots], held)
            return ReserveResult(False, False, None, [current[i] for i in p.slots], held, True)
        try:
            seen = [await f for f in peeks]
            rseen = [_bucket_tokens(await f, rs[j].entry, base) for j, f in zip(rlooked, rpeeks, strict=True)]
        except BaseException:
            self._rollback(sh, uid, token, owner, p, [], [], base)
            raise
        full = [i for i, n in zip(looked, seen, strict=True) if n >= (p.limits[i] or 0)]
        empty = [j for j, t in zip(rlooked, rseen, strict=True) if t < 1]
        if full or empty:
            for name in [p.keys[i].name for i in full[:1]] + [rs[j].name for j in empty[:1]]:
                self._was_full(name, start)
            self.refused += 1
            self._rollback(sh, uid, token, owner, p, [], [], base)
            return await self._refusal(plan, p, rs, base, dict(zip(looked, seen, strict=True)),
                                       dict(zip(rlooked, rseen, strict=True)), None)
        # the profile keys and the rate buckets: the counting-only keys and the shadow rates (they
        # cannot refuse) with the first key with a limit or enforced rate in the global order
        # (slot, then name), the others one by one in that order; then the commit
        order: list[tuple[int, int]] = [(0, i) for i in p.limited]  # (0, key) or (1, rate)
        if enforced:
            order += [(1, j) for j in enforced]
            order.sort(key=lambda s: (p.keys[s[1]].slot, p.keys[s[1]].name) if s[0] == 0
                       else (rs[s[1]].slot, rs[s[1]].name))
        sizes: list[int] = [0] * len(p.keys)
        tokens: list[float] = [0.0] * len(rs)
        stepped: list[int] = []  # keys whose step was sent (may have added the call)
        taken: list[int] = []  # rates whose take was sent (may hold a token)
        told: dict[int, float] = {}  # rates whose take answered: their tokens before it
        refused: tuple[int, int] | None = None
        last_place = 0  # keys with a limit whose last place this call took, buckets whose last token

        def send(step: tuple[int, int]) -> asyncio.Future[Any]:
            kind, i = step
            if kind == 0:
                key = p.keys[i]
                stepped.append(i)
                return batch.step(key.name, key.slot, base, uid, lease, p.limits[i], force)
            b = rs[i]
            taken.append(i)
            return batch.rate(b.name, b.slot, "t", holds[i][2], base, b.entry.rate, b.entry.burst, b.entry.shadow)

        def landed(step: tuple[int, int], got: Any) -> bool:
            """Record a step's reply; False when it refused the call."""
            nonlocal last_place
            kind, i = step
            if kind == 0:
                added, sizes[i] = got
                if not added:
                    stepped.remove(i)
                    return False
                if p.limits[i] is not None and sizes[i] == p.limits[i]:
                    last_place += 1
                return True
            tokens[i] = told[i] = float(got[0])
            if not got[1]:
                taken.remove(i)
                return rs[i].entry.shadow  # (a shadow rate without a token takes none, refuses nothing)
            if tokens[i] < 2 and not rs[i].entry.shadow:
                last_place += 1
            return True

        try:
            first = [(0, i) for i in p.counting] + [(1, j) for j, b in enumerate(rs) if b.entry.shadow] + order[:1]
            pending = [(s, send(s)) for s in first]
            for s, fut in pending:
                if not landed(s, await fut) and refused is None:
                    refused = s
            if refused is None:
                for s in order[1:]:
                    if not landed(s, await send(s)):
                        refused = s
                        break
        except BaseException:
            self._rollback(sh, uid, token, owner, p, stepped, [holds[j] for j in taken], base)
            raise
        if refused is not None:
            kind, at = refused
            self._was_full(p.keys[at].name if kind == 0 else rs[at].name, start)
            if last_place:  # it held the last place of an earlier key for a moment: see the docstring
                self.cross_slot_conflicts += 1
            if may_retry and loop.time() - start < self.timeout / 2:
                try:  # give the places and tokens back now, then try again
                    await asyncio.gather(
                        self._release_keys(uid, pack_items(["", *(p.keys[i].kid for i in stepped)]), deadline),
                        self._refund([holds[j] for j in taken], base))
                    await self._finish(sh, [uid], owner, deadline)
                    return None
                except StoreError:
                    self._spawn(self._undo(sh, uid, token, owner, []))
            else:
                self._rollback(sh, uid, token, owner, p, stepped, [holds[j] for j in taken], base)
            self.refused += 1
            known = {i: sizes[i] for i in stepped}
            for i in known:
                known[i] = max(0, known[i] - 1)
            if kind == 0:
                known[at] = sizes[at]
            for i, n in zip(looked, seen, strict=True):
                known.setdefault(i, n)
            for j, t in zip(rlooked, rseen, strict=True):
                told.setdefault(j, t)
            return await self._refusal(plan, p, rs, base, known, told, at if kind == 0 else None)
        commit_keys, commit_args = self._commit_command(sh, call, uid, owner, p, base + timeout, epoch)
        got_holds = [holds[j] for j in taken]
        try:
            reply = await self._shard("cluster_commit", sh.slot, commit_keys, commit_args)
        except BaseException:
            self._spawn(self._undo(sh, uid, token, owner, got_holds))
            raise
        status = reply[0]
        if status == -1:
            self._rollback(sh, uid, token, owner, p, stepped, got_holds, base)
            self._epoch_check(sh, epoch, reply[1], "reserve")
            raise StoreError(REBUILDING)
        if status != 1:  # a sweep took the pending record over (and refunded what it had taken then)
            self._background(self._refund(got_holds, base))
            raise StoreError("redis cluster: the reservation took longer than its lock; a sweep released it")
        if got_holds:
            self._settle(got_holds, base)
        rec = CallRecord(call.call_id, call.from_uri, call.to_uri, call.account, "early", now, None, timeout,
                         now + timeout, p.profiles, call.from_tag, call.node, token,
                         dict(call.vars) if call.vars else {})
        return ReserveResult(True, False, None, [sizes[i] for i in p.slots], rec, tokens=tokens)


    def _commit_command(self, sh: Shard, call: CallInfo, uid: str, owner: str, p: _Plan, expires: float,
                        epoch: str) -> tuple[list[str], list[Any]]:
        var_args: list[str] = []
        if call.vars:
            for name, value in call.vars.items():
                var_args += (name, value)
        return ([sh.record(uid), sh.exp, sh.locks, sh.counts, sh.nodes, sh.values],
                [uid, owner, num(expires), epoch, node_member(call.node, uid), len(p.fields),
                 len(p.valued), len(var_args) // 2, *p.fields, *p.valued, *var_args])

    def _usable(self, slot: int) -> None:
        """Raise at once when the primary of `slot` cannot be asked now (nothing is sent)."""
        link = self._map.slots[slot]
        if link is None or not link.up:
            if link is None:
                self._map.request_refresh()
                raise StoreError(f"redis cluster: no primary known for slot {slot}")
            link.pipe.errors += 1
            raise link.circuit.error()

    async def _shard(self, script: str, slot: int, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """One call of a MULTI script (sent with the others of its shard and tick): its reply."""
        return await self._batch.shard_call(self._sha[script], slot, keys, args)

    def _was_full(self, name: str, now: float) -> None:
        """Remember that a key refused a call (its next reserves look at it first)."""
        full = self._full
        if len(full) >= FULL_KEYS:
            full.clear()
        full[name] = now + FULL_MEMORY

    async def _look_all(self, p: _Plan, base: float, known: Sequence[int], sizes: Sequence[int]) -> list[int]:
        """Every key's size (the ones in `known` as given): the answer to a duplicate or a refusal."""
        have = dict(zip(known, sizes, strict=True))
        futs = {i: self._batch.look(key.name, key.slot, base) for i, key in enumerate(p.keys) if i not in have}
        try:
            for i, fut in futs.items():
                have[i] = int(await fut)
        except StoreError:
            pass  # (sizes in a reply are information: a key that cannot be read shows 0)
        return [have.get(i, 0) for i in range(len(p.keys))]

    async def _refusal(self, plan: Sequence[PlanEntry], p: _Plan, rs: Sequence[_Bucket], base: float,
                       sizes: dict[int, int], tokens: dict[int, float], refused_key: int | None) -> ReserveResult:
        """The answer to a refused reserve: every key's size and every rate's tokens (those not
        known from its looks and steps read now), the first full enforced limit in plan order and
        the first enforced rate without a whole token."""
        known = list(sizes)
        got = await asyncio.gather(self._look_all(p, base, known, [sizes[i] for i in known]),
                                   self._look_rates(rs, base, tokens))
        full, left = got[0], got[1]
        blocked = next((j for j, e in enumerate(plan) if e.limit is not None and not e.shadow
                        and full[p.slots[j]] >= e.limit), None)
        if blocked is None and refused_key is not None:  # (else the refusing key's own)
            blocked = next(j for j, e in enumerate(plan) if p.slots[j] == refused_key and e.limit is not None
                           and not e.shadow)
        rate_blocked = next((j for j, b in enumerate(rs) if not b.entry.shadow and left[j] < 1), None)
        return ReserveResult(False, False, blocked, [full[i] for i in p.slots], None,
                             rate_blocked=rate_blocked, tokens=left if rs else ())

    async def _look_rates(self, rs: Sequence[_Bucket], base: float, known: dict[int, float]) -> list[float]:
        """Every rate's tokens at `base` (the ones in `known` as given)."""
        futs = {j: self._batch.rate_look(b.name, b.slot) for j, b in enumerate(rs) if j not in known}
        have = dict(known)
        for j, fut in futs.items():
            try:
                have[j] = _bucket_tokens(await fut, rs[j].entry, base)
            except StoreError:  # (information: a bucket that cannot be read shows its burst, no refusal)
                have[j] = float(rs[j].entry.burst)
        return [have[j] for j in range(len(rs))]

    def _buckets(self, rates: Sequence[RateEntry]) -> list[_Bucket]:
        out = []
        for entry in rates:
            name, slot, rid = self._bucket(entry.rule, entry.value)
            out.append(_Bucket(name, slot, rid, entry))
        return out

    def _bucket(self, rule: str, value: str | None) -> tuple[str, int, str]:
        k = (rule, value)
        got = self._bucket_names.get(k)
        if got is None:
            if len(self._bucket_names) >= 50_000:
                self._bucket_names.clear()
            rid = rate_id(rule, value)
            name, slot = self.layout.rate(rid)
            got = self._bucket_names[k] = (name, slot, rid)
        return got

    def _holds_of(self, r: str) -> list[tuple[str, int, str]]:
        """(bucket name, slot, hold id) of each bucket a pending record's `r` lists."""
        if not r:
            return []
        owner, *rids = unpack_items(r)
        return [(*self.layout.rate(rid), f"{owner}/{j}") for j, rid in enumerate(rids)]

    async def _refund(self, holds: Sequence[tuple[str, int, str]], base: float) -> None:
        """Give back the tokens these holds took (a reserve whose call was not admitted); a hold
        that is gone (settled, expired, refunded already) gives nothing."""
        futs = [self._refund_op(name, slot, hold, base) for name, slot, hold in holds]
        await _every(futs)

    def _refund_op(self, name: str, slot: int, hold: str, base: float) -> asyncio.Future[Any]:
        fut = self._batch.rate(name, slot, "r", hold, base)
        fut.add_done_callback(self._refunded)
        return fut

    def _refunded(self, fut: asyncio.Future[Any]) -> None:
        if not fut.cancelled() and fut.exception() is None and fut.result()[1] == 1:
            self.refunded += 1

    def _settle(self, holds: Sequence[tuple[str, int, str]], base: float) -> None:
        """The call was admitted: its holds end and their tokens stay taken (sent with the tick's
        other operations on each bucket; one that is lost expires after HOLD_LEASE, the same)."""
        for name, slot, hold in holds:
            self._batch.rate(name, slot, "s", hold, base).add_done_callback(_consume)

    def _background(self, coro: Coroutine[Any, Any, Any]) -> None:
        async def run() -> None:
            with contextlib.suppress(StoreError):
                await coro

        self._spawn(run())

    def _rollback(self, sh: Shard, uid: str, token: str, owner: str, p: _Plan, stepped: Sequence[int],
                  holds: Sequence[tuple[str, int, str]], base: float) -> None:
        """Take back the steps of a reserve that holds its pending record (refused, or failed
        before its commit was sent): the removals and refunds are queued now (so an operation
        queued after this one on the same primary sees them), the pending record goes once they
        are done."""
        self.rollbacks += 1
        removals = [self._batch.remove(p.keys[i].name, p.keys[i].slot, uid) for i in stepped]
        removals += [self._refund_op(name, slot, hold, base) for name, slot, hold in holds]
        self._batch.flush()
        self._spawn(self._finish_rollback(sh, uid, token, owner, removals))

    async def _finish_rollback(self, sh: Shard, uid: str, token: str, owner: str,
                               removals: list[asyncio.Future[Any]]) -> None:
        try:
            for fut in removals:
                await fut
            await self._finish(sh, [uid], owner, None)
        except StoreError:
            await self._undo(sh, uid, token, owner, [])

    async def _undo(self, sh: Shard, uid: str, token: str, reserve_owner: str,
                    holds: Sequence[tuple[str, int, str]]) -> None:
        """Take back what one reserve did when its outcome is unknown (its commit failed or came
        too late, or its rollback failed): pending or committed, by its token, never an admission
        a later check took over. A pending record's tokens are refunded (the call never became
        held); a committed one's `holds` are settled (its tokens stay taken, as the single store's
        undo: the proxy may have been told anything). Retried for RETRY_FOR seconds, then left to
        the sweeps."""
        loop = asyncio.get_running_loop()
        give_up = loop.time() + RETRY_FOR
        delay = 0.02
        while not self.closed:
            try:
                base = self._base(self._now())
                owner = self._owner()
                self._usable(sh.slot)
                reply = await self._shard(
                    "cluster_release", sh.slot, [sh.record(uid), sh.exp, sh.locks, sh.counts, sh.nodes, sh.values],
                    [num(base), uid, "undo", token, "", num(base + LOCK_LEASE), owner, reserve_owner])
                status = reply[0]
                if status == 4:
                    raise StoreError("busy")
                if status == 3:
                    self.handed_back += 1
                    log.info("redis_unanswered_takeover_undone", call=uid)
                elif status == 1:
                    rec = _hash(reply[1:])
                    held = rec.get("s") in _HELD
                    if held:
                        self._settle(holds, base)
                    await asyncio.gather(self._release_keys(uid, rec.get("k", ""), None),
                                         self._refund(self._holds_of(rec.get("r", "")), base))
                    await self._finish(sh, [uid], owner, None)
                    if held:
                        self.undone += 1
                        log.warning("redis_unanswered_reserve_released", call=uid)
                return
            except StoreError:
                if loop.time() > give_up:
                    self.unfinished += 1
                    log.warning("redis_cluster_release_left_to_sweep", call=uid)
                    return
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))
                delay = min(delay * 2, 0.5)

    async def _release_keys(self, uid: str, k: str, deadline: float | None) -> None:
        """Remove the call from every key its record's `k` lists (coalesced per key and tick)."""
        futs = []
        for kid in unpack_items(k)[1:]:
            name, slot = self.layout.key_of_kid(kid)
            futs.append(self._batch.remove(name, slot, uid))
        await _every(futs)

    # -- the life of a call -------------------------------------------------------------------

    async def _busy(self, loop: asyncio.AbstractEventLoop, deadline: float) -> None:
        self.busy_waits += 1
        if loop.time() + BUSY_PAUSE >= deadline:
            raise StoreError("redis cluster: another operation holds this call")
        await asyncio.sleep(BUSY_PAUSE)

    async def end(self, uid: str, now: float, reason: str, token: str | None = None) -> CallRecord | None:
        """Release a held call: its shard, then its profile keys, then its record."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.budget
        sh = self.layout.shard(uid)
        base = self._base(now)
        counter = "failed" if reason in FAILED_REASONS else "expired" if reason == "timeout" else ""
        owner = self._owner()
        keys = [sh.record(uid), sh.exp, sh.locks, sh.counts, sh.nodes, sh.values]
        args = [num(base), uid, "end", token or "", counter, num(base + LOCK_LEASE), owner, ""]
        self._usable(sh.slot)
        reply = await self._shard("cluster_release", sh.slot, keys, args)
        while reply[0] == 4:
            await self._busy(loop, deadline)
            reply = await self._shard("cluster_release", sh.slot, keys, args)
        status = reply[0]
        if status == 0:
            return None
        rec = decode_record(reply[1:], self._offset)
        if status == 2:
            return rec
        k = _hash(reply[1:]).get("k", "")
        try:
            await self._release_keys(uid, k, deadline)
            await self._finish(sh, [uid], owner, deadline)
        except StoreError:
            self._spawn(self._complete(sh, uid, k, owner))
        return rec

    async def _complete(self, sh: Shard, uid: str, k: str, owner: str) -> None:
        """Finish a release whose profile keys or record could not be reached (retried, then left
        to the sweeps, which take the ended lock over)."""

        async def once() -> None:
            await self._release_keys(uid, k, None)
            await self._finish(sh, [uid], owner, None)

        await self._retrying(once, uid)

    async def _lease(self, uid: str, now: float, timeout: float, token: str | None, answer: bool) -> CallRecord | None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.budget
        sh = self.layout.shard(uid)
        base = self._base(now)
        expires = base + timeout
        owner = self._owner()
        keys = [sh.record(uid), sh.exp, sh.counts, sh.locks]
        args = [num(base), num(expires), num(timeout), uid, token or "", "1" if answer else "", "lock",
                num(base + LOCK_LEASE), owner]
        reply = await self._call(sh.slot, self._pack("cluster_lease", keys, args), deadline)
        while reply[0] == 4:
            await self._busy(loop, deadline)
            reply = await self._call(sh.slot, self._pack("cluster_lease", keys, args), deadline)
        status = reply[0]
        if status == 0:
            return None
        if status == 2:
            return decode_record(reply[1:], self._offset)
        before, k = float(reply[1]), str(reply[2])
        args[6] = "set"
        try:
            if expires != before:  # the entries carry the record's lease
                cmds = []
                for kid in unpack_items(k)[1:]:
                    name, slot = self.layout.key_of_kid(kid)
                    cmds.append((slot, _packed("ZADD", name, "XX", num(expires), uid)))
                await self._all(cmds, deadline)
            reply = await self._call(sh.slot, self._pack("cluster_lease", keys, args), deadline)
        except StoreError:
            self._spawn(self._unlock(sh, uid, owner))
            raise
        return maybe_record(reply, self._offset)

    async def _unlock(self, sh: Shard, uid: str, owner: str) -> None:
        """Let go of a held call this owner locked (retried, then left to the sweeps)."""
        with contextlib.suppress(StoreError):
            await self._retrying(lambda: self._finish(sh, [uid], owner, None), uid)

    async def _retrying(self, fn: Callable[[], Awaitable[Any]], uid: str) -> bool:
        """Run a background step until it works, for RETRY_FOR seconds at most."""
        loop = asyncio.get_running_loop()
        give_up = loop.time() + RETRY_FOR
        delay = 0.02
        while not self.closed:
            try:
                await fn()
                return True
            except StoreError:
                if loop.time() > give_up:
                    self.unfinished += 1
                    log.warning("redis_cluster_release_left_to_sweep", call=uid)
                    return False
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))
                delay = min(delay * 2, 0.5)
        return False

    async def answer(self, uid: str, now: float, timeout: float, token: str | None = None) -> CallRecord | None:
        """Mark a held call answered with a new lease."""
        return await self._lease(uid, now, timeout, token, True)

    async def refresh(self, uid: str, now: float, timeout: float, token: str | None = None) -> CallRecord | None:
        """Extend a held call's lease."""
        return await self._lease(uid, now, timeout, token, False)

    async def set_var(self, uid: str, name: str, value: str | None, now: float) -> CallRecord | None:
        """Set or delete one variable of a held call."""
        sh = self.layout.shard(uid)
        reply = await self._call(sh.slot, self._pack("cluster_set_var", [sh.record(uid)],
                                                     [num(self._base(now)), name, value or "",
                                                      "1" if value is None else ""]),
                                 None)
        return maybe_record(reply, self._offset)

    async def get_call(self, uid: str, now: float) -> CallRecord | None:
        """The record of a held call."""
        sh = self.layout.shard(uid)
        return self._live(await self._call(sh.slot, _packed("HGETALL", sh.record(uid)), None), self._base(now))

    def _live(self, flat: Any, base: float) -> CallRecord | None:
        if not flat:
            return None
        h = _hash(flat)
        if h.get("s") not in _HELD or float(h.get("e", 0)) <= base:
            return None
        return decode_record(flat, self._offset)

    async def _records(self, uids: Sequence[str], base: float) -> list[CallRecord | None]:
        cmds = []
        for uid in uids:
            sh = self.layout.shard(uid)
            cmds.append((sh.slot, _packed("HGETALL", sh.record(uid))))
        return [self._live(flat, base) for flat in await self._all(cmds, None)]

    # -- sizes, stats, listings ---------------------------------------------------------------

    async def _shard_counts(self, fields: Sequence[str], base: float) -> list[list[int]]:
        """Every shard's held calls and counter `fields` (each shard swept first if it must be)."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        deadline = start + self.budget
        out: list[list[int]] = []
        sends = []
        for sh in self.layout.shards:
            data = self._pack("cluster_counts", [sh.counts, sh.exp], [num(base), "", *fields])
            sends.append((sh, data, self._send(sh.slot, data, deadline)))
        for sh, data, fut in sends:
            reply = await self._reply(sh.slot, data, fut, deadline)
            attempt = 0
            while reply == [-2]:
                attempt += 1
                last = attempt >= STALE_ROUNDS or loop.time() - start > self.timeout / 2
                if not last:
                    await self._catch_up(sh, base, deadline)
                data = self._pack("cluster_counts", [sh.counts, sh.exp], [num(base), "1" if last else "", *fields])
                reply = await self._call(sh.slot, data, deadline)
            out.append([int(x) for x in reply[1:]])
        return out

    async def profile_size(self, profile: str, value: str | None, now: float) -> int:
        """Calls in the key (its live entries), or in any key of the profile (the key without
        value plus the shards' counters of the valued keys)."""
        base = self._base(now)
        key = self._key(profile, value)
        n = int(await self._call(key.slot, _packed("ZCOUNT", key.name, f"({num(base)}", "+inf"), None))
        if value is None:
            ep = escape(profile)
            for _, p, x in await self._shard_counts(["p:" + ep, "x:" + ep], base):
                n += p - x
        return n

    async def stats(self, now: float) -> DialogStats:
        """Dialog statistics of every instance sharing this cluster and prefix (sum of shards)."""
        held = active = processed = expired = failed = 0
        for h, a, p, e, f in await self._shard_counts(["active", "processed", "expired", "failed"],
                                                      self._base(now)):
            held += h
            active += a
            processed += p
            expired += e
            failed += f
        return DialogStats(active_dialogs=max(active, 0), early_dialogs=max(held - active, 0),
                           processed_dialogs=processed, expired_dialogs=expired, failed_dialogs=failed)

    async def _key_page(self, key: _Key, after: tuple[str, str] | None, limit: int,
                        base: float) -> tuple[list[tuple[str, str]], bool]:
        """Up to `limit` (uid, score) of a key after `after`; whether there are more."""
        score, member = after if after else ("", "")
        reply = await self._call(key.slot, self._pack("cluster_page", [key.name],
                                                      [num(base), score, member, limit]), None)
        pairs = list(zip(reply[0::2], reply[1::2], strict=True))
        return pairs[:limit], len(pairs) > limit

    async def _next_values(self, profile: str, after: str | None, limit: int) -> tuple[list[str], bool]:
        """Up to `limit` of a profile's values after `after`, merged from every shard's index."""
        ep = (escape(profile) + "=").encode()
        lo = (b"(" + ep + after.encode()) if after is not None else b"[" + ep
        hi = b"[" + ep + b"\xff"
        cmds = [(sh.slot, _packed("ZRANGEBYLEX", sh.values, lo, hi, "LIMIT", 0, limit + 1))
                for sh in self.layout.shards]
        merged: set[str] = set()
        for got in await self._all(cmds, None):
            merged.update(got)
        vals = sorted(merged, key=lambda s: s.encode())
        n = len(ep.decode())
        return [v[n:] for v in vals[:limit]], len(vals) > limit

    async def profile_values(self, profile: str, now: float, cursor: str = "", limit: int = MAX_PAGE) -> Page:
        """A page of (value, size) of a profile's non-empty values, in value order."""
        if cursor and not cursor.startswith("v"):
            raise StoreError(f"bad cursor {cursor!r}")
        limit = max(1, min(limit, MAX_PAGE))
        base = self._base(now)
        values, more = await self._next_values(profile, cursor[1:] if cursor else None, limit)
        keys = [self._key(profile, v) for v in values]
        sizes = await self._all([(k.slot, _packed("ZCOUNT", k.name, f"({num(base)}", "+inf")) for k in keys], None)
        items = [(v, int(n)) for v, n in zip(values, sizes, strict=True) if int(n) > 0]
        return Page(items, "v" + values[-1] if more and values else "")

    async def profile_list(self, profile: str, value: str | None, now: float,
                           cursor: str = "", limit: int = MAX_PAGE) -> Page:
        """A page of the calls in the key, or in any key of the profile (its key without value,
        then each value's key in value order; a call in several of them under the first its
        record names)."""
        limit = max(1, min(limit, MAX_PAGE))
        base = self._base(now)
        state = _cursor(cursor)
        if value is not None:
            if state and state[0] != "k":
                raise StoreError(f"bad cursor {cursor!r}")
            after = (str(state[1]), str(state[2])) if state else None
            pairs, more = await self._key_page(self._key(profile, value), after, limit, base)
            recs = await self._records([u for u, _ in pairs], base)
            nxt = _encode_cursor(["k", pairs[-1][1], pairs[-1][0]]) if more and pairs else ""
            return Page([r for r in recs if r is not None], nxt)
        stage = state[0] if state else "n"
        if stage not in ("n", "v", "w"):
            raise StoreError(f"bad cursor {cursor!r}")
        try:
            found, nxt = await self._walk(profile, stage, state or ["n"], limit, base)
        except (IndexError, TypeError, ValueError):
            raise StoreError(f"bad cursor {cursor!r}") from None
        recs = await self._records([u for u, _ in found], base)
        out: list[CallRecord] = []
        for rec, (_, under) in zip(recs, found, strict=True):
            if rec is None:
                continue
            first = next((v for p, v in rec.profiles if p == profile), None)
            if (under == "-" and first is None) or (first is not None and under == "=" + first):
                out.append(rec)
        return Page(out, nxt)

    async def _walk(self, profile: str, stage: str, state: list[Any], limit: int,
                    base: float) -> tuple[list[tuple[str, str]], str]:
        """(uid, where it was found: '-' or '=' value) of a page of a whole profile; the cursor."""
        found: list[tuple[str, str]] = []
        value: str | None = None
        if stage == "n":
            after = (str(state[1]), str(state[2])) if len(state) == 3 else None
            pairs, more = await self._key_page(self._key(profile, None), after, limit, base)
            found += [(u, "-") for u, _ in pairs]
            if more:
                return found, _encode_cursor(["n", pairs[-1][1], pairs[-1][0]])
        elif stage == "v":
            value = str(state[1])
            pairs, more = await self._key_page(self._key(profile, value), (str(state[2]), str(state[3])),
                                               limit, base)
            found += [(u, "=" + value) for u, _ in pairs]
            if more:
                return found, _encode_cursor(["v", value, pairs[-1][1], pairs[-1][0]])
        else:
            value = None if state[1] is None else str(state[1])
        while len(found) < limit:
            values, more_values = await self._next_values(profile, value, limit)
            for v in values:
                room = limit - len(found)
                if room <= 0:
                    return found, _encode_cursor(["w", value])
                pairs, more = await self._key_page(self._key(profile, v), None, room, base)
                found += [(u, "=" + v) for u, _ in pairs]
                if more:
                    return found, _encode_cursor(["v", v, pairs[-1][1], pairs[-1][0]])
                value = v
            if not more_values:
                return found, ""
        return found, _encode_cursor(["w", value])

    async def node_calls(self, node: str, now: float, cursor: str = "", limit: int = MAX_PAGE) -> Page:
        """A page of the calls admitted through `node`, shard by shard (in uid order in each)."""
        limit = max(1, min(limit, MAX_PAGE))
        state = _cursor(cursor)
        if state and (state[0] != "o" or not isinstance(state[1], int)):
            raise StoreError(f"bad cursor {cursor!r}")
        start, member = (int(state[1]), str(state[2])) if state else (0, "")
        prefix = node_prefix(node)
        hi = b"[" + prefix + b"\xff"
        uids: list[str] = []
        nxt = ""
        last: tuple[int, str] | None = None
        index = start
        n = len(prefix)
        while index < SHARDS and not nxt:
            group = list(range(index, min(SHARDS, index + 8)))
            cmds = []
            for i in group:
                lo = (b"(" + member.encode()) if i == start and member else b"[" + prefix
                cmds.append((self.layout.shards[i].slot,
                             _packed("ZRANGEBYLEX", self.layout.shards[i].nodes, lo, hi, "LIMIT", 0, limit + 1)))
            for i, got in zip(group, await self._all(cmds, None), strict=True):
                for m in got:
                    if len(uids) == limit and last is not None:
                        nxt = _encode_cursor(["o", last[0], last[1]])
                        break
                    uids.append(m.encode()[n:].decode())
                    last = (i, m)
                if nxt:
                    break
            index = group[-1] + 1
        recs = await self._records(uids, self._base(now))
        return Page([r for r in recs if r is not None], nxt)

    # -- sweeping -----------------------------------------------------------------------------

    async def _catch_up(self, sh: Shard, base: float, deadline: float) -> None:
        """Drop a shard's ended leases (one sweep of a shard at a time, shared by every waiter)."""
        task = self._catching.get(sh.index)
        if task is None or task.done():
            task = self._catching[sh.index] = asyncio.get_running_loop().create_task(
                self._sweep_shard(sh, base, deadline, pop=False))
        await asyncio.shield(task)

    async def _sweep_shard(self, sh: Shard, base: float, deadline: float | None,
                           pop: bool) -> tuple[list[CallRecord], bool]:
        """One round of one shard: calls whose lease (or lock) ended, released; reports popped."""
        b = num(base)
        cmds = [(sh.slot, _packed("ZRANGEBYSCORE", sh.exp, "-inf", b, "LIMIT", 0, SWEEP_BATCH)),
                (sh.slot, _packed("ZRANGEBYSCORE", sh.locks, "-inf", b, "LIMIT", 0, SWEEP_BATCH))]
        if pop:
            cmds.append((sh.slot, _packed("LPOP", sh.reports, REPORT_BATCH)))
        got = await self._all(cmds, deadline)
        due, ended = got[0], got[1]
        raw = list(got[2] or []) if pop else []
        more = len(due) == SWEEP_BATCH or len(ended) == SWEEP_BATCH or len(raw) == REPORT_BATCH
        uids = list(dict.fromkeys([*due, *ended]))
        if uids:
            owner = self._owner()
            epoch = "" if self._rebuilding else (self._epochs[sh.index] or "")
            reply = await self._call(sh.slot, self._pack(
                "cluster_expire", [sh.exp, sh.locks, sh.counts, sh.nodes, sh.values, sh.reports,
                                   *(sh.record(u) for u in uids)],
                [b, num(base + LOCK_LEASE), owner, epoch, MAX_REPORTS, REPORT_BATCH if pop else 0, *uids]),
                deadline)
            if reply[0] == -1:
                self._epoch_check(sh, epoch, reply[1], "sweep")
                return [], False
            n = int(reply[1])
            locked = reply[2:2 + 3 * n]
            raw += reply[2 + 3 * n:]
            if n:
                uids_k_r = list(zip(locked[0::3], locked[1::3], locked[2::3], strict=True))
                await asyncio.gather(*(self._release_keys(uid, k, deadline) for uid, k, _ in uids_k_r),
                                     self._refund([h for _, _, r in uids_k_r for h in self._holds_of(r)], base))
                await self._finish(sh, locked[0::3], owner, deadline)
        out = []
        for r in raw:
            try:
                out.append(decode_record(unpack_items(r), self._offset))
            except (StoreError, ValueError) as exc:
                log.error("redis_bad_expiry_report", error=str(exc))
        return out, more

    async def sweep(self, now: float) -> list[CallRecord]:
        """Drop every call whose lease ended by `now` in every shard; the expired calls no sweep
        reported yet (each exactly once across every instance)."""
        base = self._base(now)
        out: list[CallRecord] = []
        todo = list(self.layout.shards)
        failed: StoreError | None = None
        for _ in range(SWEEP_ROUNDS):
            results = await asyncio.gather(*(self._sweep_shard(sh, base, None, pop=True) for sh in todo),
                                           return_exceptions=True)
            again = []
            for sh, res in zip(todo, results, strict=True):
                if isinstance(res, StoreError):
                    failed = res
                    continue
                if isinstance(res, BaseException):
                    raise res
                recs, more = res
                out += recs
                if more:
                    again.append(sh)
            if not again:
                break
            todo = again
        if failed is not None and not out:
            raise failed
        return out


async def _every(futs: Sequence[Awaitable[Any]]) -> None:
    """Wait for every one of these (each was sent already), then raise the first StoreError."""
    failed: StoreError | None = None
    for fut in futs:
        try:
            await fut
        except StoreError as exc:
            failed = failed or exc
    if failed is not None:
        raise failed


def _packed(*cmd: Any) -> bytes:
    return bytes(hiredis.pack_command(cmd))


def _consume(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()


def _hash(flat: Sequence[Any]) -> dict[str, str]:
    it = iter(flat)
    return dict(zip(it, it, strict=False))


def _encode_cursor(parts: list[Any]) -> str:
    return "c" + orjson.dumps(parts).decode()


def _cursor(cursor: str) -> list[Any] | None:
    if not cursor:
        return None
    try:
        parts = orjson.loads(cursor[1:]) if cursor.startswith("c") else None
    except orjson.JSONDecodeError:
        parts = None
    if not isinstance(parts, list) or not parts or not isinstance(parts[0], str):
        raise StoreError(f"bad cursor {cursor!r}")
    return parts


__all__ = ["REBUILDING", "RedisClusterStore", "cluster_script_source", "is_cluster_url"]
