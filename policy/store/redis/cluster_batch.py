"""Coalescing of the profile-key operations of one event-loop tick, key by key.

A key that every call joins (``total`` in the shipped rules) is touched by every check and every
end: on a single Redis that is one line of one script; in a cluster it is one command of its
own on that key's primary per check. Under load many checks share a tick, so the store hands
these operations to a `KeyBatcher`, which sends, at the end of the tick, per key:

- **one step script** (`cluster_step.lua`) for every call that tick adds to the key, in the
  order the calls asked: each gets its own verdict and size, exactly as if it had been alone
  (the script checks and adds them one after the other, atomically);
- **one ZREM** of every call that tick removes from it;
- **one ZCOUNT** (the reserve's look at a key's size) shared by every look of that tick;
- per call-rate bucket, **one rate script** (`cluster_rate.lua`) for every take, settle and
  refund of the tick, in order, and **one HMGET** shared by the tick's looks at its tokens;
- and per shard one script for each of the tick's begins, commits, releases (`cluster.MULTI`:
  each call's reply is one element of its reply) and finishes.

So the hottest key costs one command per tick instead of one per call, and the client packs and
parses far fewer commands. Redirects (MOVED, ASK, TRYAGAIN) are followed for the batch.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

import hiredis

from policy.errors import StoreError
from policy.store.redis.cluster_map import ClusterMap


class _Batch:
    __slots__ = ("args", "futs", "slot")

    def __init__(self, slot: int) -> None:
        self.slot = slot
        self.args: list[Any] = []
        self.futs: list[asyncio.Future[Any]] = []


class KeyBatcher:
    """Steps, removals and looks of one tick, coalesced per key (see the module docstring)."""

    def __init__(self, cmap: ClusterMap, step_sha: Callable[[], str], finish_sha: Callable[[], str],
                 rate_sha: Callable[[], str], hold_lease: float, rate_slack_ms: int) -> None:
        self.cmap = cmap
        self._step_sha = step_sha
        self._finish_sha = finish_sha
        self._rate_sha = rate_sha
        self._hold_lease = repr(float(hold_lease))
        self._slack = str(int(rate_slack_ms))
        self._rates: dict[str, tuple[_Batch, list[float]]] = {}
        self._rate_looks: dict[str, _Batch] = {}
        self._steps: dict[str, tuple[_Batch, list[float]]] = {}
        self._finishes: dict[str, tuple[_Batch, list[str]]] = {}  # locks key -> (records)
        self._shards: dict[tuple[str, int], tuple[_Batch, list[str]]] = {}  # (sha, slot) -> (keys)
        self._removes: dict[str, _Batch] = {}
        self._looks: dict[str, tuple[_Batch, list[float]]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._scheduled = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self.commands = 0  # commands sent
        self.operations = 0  # operations they carried

    def _fut(self) -> asyncio.Future[Any]:
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._flush)
        return loop.create_future()

    def step(self, name: str, slot: int, now: float, uid: str, lease: str, limit: int | None,
             force: bool) -> asyncio.Future[Any]:
        """Add the call to the key (checking `limit` unless `force`): a future of (status, size)."""
        fut = self._fut()
        got = self._steps.get(name)
        if got is None:
            got = self._steps[name] = (_Batch(slot), [now])
        batch, nows = got
        nows[0] = min(nows[0], now)
        batch.args += (uid, lease, "" if limit is None else limit, "1" if force else "")
        batch.futs.append(fut)
        return fut

    def remove(self, name: str, slot: int, uid: str) -> asyncio.Future[Any]:
        """Remove the call from the key: a future of None once done."""
        fut = self._fut()
        batch = self._removes.get(name)
        if batch is None:
            batch = self._removes[name] = _Batch(slot)
        batch.args.append(uid)
        batch.futs.append(fut)
        return fut

    def look(self, name: str, slot: int, now: float) -> asyncio.Future[Any]:
        """The key's size (entries whose lease ends after `now`; shared by the tick's looks)."""
        fut = self._fut()
        got = self._looks.get(name)
        if got is None:
            got = self._looks[name] = (_Batch(slot), [now])
        batch, nows = got
        nows[0] = min(nows[0], now)
        batch.futs.append(fut)
        return fut

    def rate(self, name: str, slot: int, op: str, hold: str, now: float, rate: float = 0.0, burst: int = 0,
             shadow: bool = False) -> asyncio.Future[Any]:
        """One operation on a call-rate bucket (cluster_rate.lua): 't' take, 's' settle, 'r' refund
        of the hold `hold`. A future of (tokens before as text, 1 or 0) for a take, ('', 1 or 0)
        for the others."""
        fut = self._fut()
        got = self._rates.get(name)
        if got is None:
            got = self._rates[name] = (_Batch(slot), [now])
        batch, nows = got
        nows[0] = min(nows[0], now)
        batch.args += (op, hold, repr(float(now)), repr(float(rate)), burst, "s" if shadow else "")
        batch.futs.append(fut)
        return fut

    def rate_look(self, name: str, slot: int) -> asyncio.Future[Any]:
        """A bucket's tokens `t` and their time `ts` (None, None when it is missing: full)."""
        fut = self._fut()
        batch = self._rate_looks.get(name)
        if batch is None:
            batch = self._rate_looks[name] = _Batch(slot)
        batch.futs.append(fut)
        return fut

    def finish(self, slot: int, locks: str, record: str, uid: str, owner: str) -> asyncio.Future[Any]:
        """cluster_finish of one call of a shard (`locks` names the shard): a future of None."""
        fut = self._fut()
        got = self._finishes.get(locks)
        if got is None:
            got = self._finishes[locks] = (_Batch(slot), [])
        batch, records = got
        records.append(record)
        batch.args += (uid, owner)
        batch.futs.append(fut)
        return fut

    def shard_call(self, sha: str, slot: int, keys: Sequence[str], args: Sequence[Any]) -> asyncio.Future[Any]:
        """One call of a script run for several calls at once (cluster.py MULTI): its reply."""
        fut = self._fut()
        got = self._shards.get((sha, slot))
        if got is None:
            got = self._shards[(sha, slot)] = (_Batch(slot), [])
        batch, all_keys = got
        all_keys += keys
        batch.args += (len(keys), len(args), *args)
        batch.futs.append(fut)
        return fut

    def flush(self) -> None:
        """Send what waits now (so that a command queued after this on a primary sees it)."""
        self._flush()

    def _flush(self) -> None:
        self._scheduled = False  # (a flush still scheduled finds nothing, or the next tick's)
        steps, self._steps = self._steps, {}
        removes, self._removes = self._removes, {}
        looks, self._looks = self._looks, {}
        finishes, self._finishes = self._finishes, {}
        shards, self._shards = self._shards, {}
        rates, self._rates = self._rates, {}
        rate_looks, self._rate_looks = self._rate_looks, {}
        for (script, _), (batch, all_keys) in shards.items():
            self._send(batch, _packed("EVALSHA", script, len(all_keys), *all_keys, *batch.args), _each)
        sha = self._step_sha()
        for name, (batch, nows) in steps.items():
            data = _packed("EVALSHA", sha, 1, name, repr(nows[0]), *batch.args)
            self._send(batch, data, _pairs)
        if rates:
            sha = self._rate_sha()
            for name, (batch, nows) in rates.items():
                data = _packed("EVALSHA", sha, 1, name, repr(nows[0]), self._hold_lease, self._slack, *batch.args)
                self._send(batch, data, _rate_pairs)
        for name, batch in rate_looks.items():
            self._send(batch, _packed("HMGET", name, "t", "ts"), _shared)
        for name, batch in removes.items():
            self._send(batch, _packed("ZREM", name, *batch.args), _each_none)
        for name, (batch, nows) in looks.items():
            self._send(batch, _packed("ZCOUNT", name, f"({nows[0]!r}", "+inf"), _shared_int)
        if finishes:
            sha = self._finish_sha()
            for locks, (batch, records) in finishes.items():
                self._send(batch, _packed("EVALSHA", sha, 1 + len(records), locks, *records, *batch.args),
                           _each_none)

    def _send(self, batch: _Batch, data: bytes, split: Callable[[Any, int], list[Any]]) -> None:
        self.commands += 1
        self.operations += len(batch.futs)
        try:
            fut = self.cmap.send(batch.slot, data, None)
        except StoreError as exc:
            self._recover(batch, data, split, exc)
            return

        def done(f: asyncio.Future[Any]) -> None:
            if f.cancelled():
                _fail(batch, StoreError("redis cluster: cancelled"))
                return
            exc = f.exception()
            if exc is None:
                _deliver(batch, f.result(), split)
            elif isinstance(exc, StoreError):
                self._recover(batch, data, split, exc)
            else:
                _fail(batch, StoreError(f"redis cluster: {exc!r}"))

        fut.add_done_callback(done)

    def _recover(self, batch: _Batch, data: bytes, split: Callable[[Any, int], list[Any]], exc: StoreError) -> None:
        async def run() -> None:
            try:
                reply = await self.cmap.recover(exc, batch.slot, data, None)
            except StoreError as again:
                _fail(batch, again)
                return
            _deliver(batch, reply, split)

        loop = self._loop or asyncio.get_running_loop()
        task = loop.create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        """Cancel redirects being followed."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def _packed(*cmd: Any) -> bytes:
    return bytes(hiredis.pack_command(cmd))


def _deliver(batch: _Batch, reply: Any, split: Callable[[Any, int], list[Any]]) -> None:
    try:
        parts = split(reply, len(batch.futs))
    except (TypeError, ValueError, IndexError):
        _fail(batch, StoreError(f"unexpected reply from redis cluster: {reply!r}"))
        return
    for fut, part in zip(batch.futs, parts, strict=True):
        if not fut.done():
            fut.set_result(part)


def _fail(batch: _Batch, exc: StoreError) -> None:
    for fut in batch.futs:
        if not fut.done():
            fut.set_exception(exc)
            fut.add_done_callback(_consume)


def _consume(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()


def _pairs(reply: Any, n: int) -> list[Any]:
    if not isinstance(reply, list) or len(reply) != 2 * n:
        raise ValueError("step reply")
    return [(int(reply[2 * i]), int(reply[2 * i + 1])) for i in range(n)]


def _rate_pairs(reply: Any, n: int) -> list[Any]:
    if not isinstance(reply, list) or len(reply) != 2 * n:
        raise ValueError("rate reply")
    return [(reply[2 * i], int(reply[2 * i + 1])) for i in range(n)]


def _shared(reply: Any, n: int) -> list[Any]:
    return [reply] * n


def _each(reply: Any, n: int) -> list[Any]:
    if not isinstance(reply, list) or len(reply) != n:
        raise ValueError("multi reply")
    return reply


def _each_none(reply: Any, n: int) -> list[Any]:
    if not isinstance(reply, int):
        raise ValueError("ZREM reply")
    return [None] * n


def _shared_int(reply: Any, n: int) -> list[Any]:
    return [int(reply)] * n
