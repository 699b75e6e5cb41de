"""The Redis counter store: leases in sorted sets, one Lua script per operation.

Every operation is one atomic Lua script (``policy/store/lua/*.lua``, each headed by its
KEYS, ARGV and return value), so any number of service instances sharing one Redis see
one truth: a cap of 10 holds across all of them, and a call admitted by an instance that
died is still listed, still released by `end`, and dropped at its lease expiry otherwise.

Key layout (every key carries the hash tag ``{prefix}``, so a Redis Cluster would place
them all on one slot, which the multi-key scripts need):

- ``{P}:k:<profile>`` / ``{P}:k:<profile>=<value>``: zset of call ids scored by lease expiry
- ``{P}:i:<profile>``: set of the profile's non-empty keys with a value (profile_size without one)
- ``{P}:c:<call id>``: hash, the call record (state, timestamps, from/to/account, keys)
- ``{P}:exp``: zset of every held call id scored by lease expiry (the sweep's index)
- ``{P}:stats``: hash of counters (processed, expired, failed, active; early = held - active)

Speed: store operations that arrive in the same event-loop tick (and while a round trip is
in flight) go to Redis as ONE pipelined write of EVALSHA commands on a dedicated connection,
and their replies are read back in order. Every operation is bounded by `timeout`: past it,
it raises `StoreError`, and a round trip that overran drops its connection so a hung socket
cannot stall later calls; the next operation reconnects.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import os
import select
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

import hiredis
import orjson
import structlog
from redis.asyncio import Redis
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError, NoScriptError, ReadOnlyError, RedisError, ResponseError
from redis.retry import Retry

from policy.errors import StoreError
from policy.store.base import (
    FAILED_REASONS,
    CallInfo,
    CallRecord,
    CounterStore,
    DialogStats,
    PlanEntry,
    ReserveResult,
)

if TYPE_CHECKING:
    from redis.asyncio.client import Redis as RedisClient
    from redis.asyncio.connection import AbstractConnection
    from redis.commands.core import AsyncScript

    from policy.settings import Settings

log = structlog.get_logger("policy.store.redis")

SCRIPTS = ("reserve", "answer", "refresh", "end", "get", "size", "list", "stats", "sweep")
#: How many ended leases one sweep script drops at most (the sweep loops for more).
SWEEP_BATCH = 1000
#: Bound on sweep/stats rounds per call, so a huge backlog cannot hold one call forever.
MAX_ROUNDS = 50
#: At most this many operations per round trip (~8 ms of Redis time for reserves), so one
#: round trip never takes long enough to look like a slow Redis.
MAX_BATCH = 128
#: A call waiting this long in our own queue (a service overloaded beyond what Redis answers)
#: fails even though Redis is answering, so the queue cannot grow without bound.
MAX_QUEUE_WAIT = 1.0
#: Reserves whose outcome is unknown, kept for release once Redis answers again (bounded).
MAX_PENDING_UNDO = 100_000
#: How many of them are retried after each successful round trip.
UNDO_PER_BATCH = 32
#: Key names remembered per store (cleared when full).
KEY_CACHE = 50_000


def load_script_source(name: str) -> str:
    """The text Redis runs for operation `name`: the shared helpers, then the operation."""
    base = resources.files("policy.store") / "lua"
    lib = (base / "_lib.lua").read_text(encoding="utf-8")
    body = (base / f"{name}.lua").read_text(encoding="utf-8")
    return lib + "\n" + body


def _num(x: float) -> str:
    """A float as text Redis and Lua parse back to the same double."""
    return repr(float(x))


def _esc(profile: str) -> str:
    return profile.replace("%", "%25").replace("=", "%3D")


def parse_sentinel_url(url: str) -> tuple[list[tuple[str, int]], str, int, str | None, str | None]:
    """Split ``redis+sentinel://[user:pass@]host:port[,host:port]/service[/db]``."""
    parts = urlsplit(url)
    netloc = parts.netloc
    username = password = None
    if "@" in netloc:
        cred, netloc = netloc.rsplit("@", 1)
        if ":" in cred:
            u, p = cred.split(":", 1)
            username, password = unquote(u) or None, unquote(p)
        else:
            password = unquote(cred)
    hosts = [_hostport(h, 26379) for h in netloc.split(",") if h]
    if not hosts:
        raise StoreError(f"no sentinel address in {url!r}")
    path = [p for p in parts.path.split("/") if p]
    service = unquote(path[0]) if path else "mymaster"
    try:
        db = int(path[1]) if len(path) > 1 else 0
    except ValueError:
        raise StoreError(f"bad database number in {url!r}") from None
    return hosts, service, db, username, password


def _hostport(text: str, default: int) -> tuple[str, int]:
    text = text.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") else default
    host, sep, port = text.rpartition(":")
    if not sep:
        return text, default
    try:
        return host, int(port)
    except ValueError:
        raise StoreError(f"bad port in sentinel address {text!r}") from None


@dataclass(slots=True)
class _Op:
    cmd: tuple[Any, ...]
    fut: asyncio.Future[Any]
    undo: tuple[str, str] | None = None  # a reserve's (call id, token), to release it again
    born: float = 0.0  # loop time it was queued


class RedisStore(CounterStore):
    """Dialog-profile counters shared through Redis by every service instance."""

    name = "redis"

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "callpolicy",
        timeout: float = 0.05,
        sentinels: list[str] | None = None,
        sentinel_service: str = "mymaster",
    ) -> None:
        if not timeout > 0:
            raise StoreError(f"redis store timeout must be > 0, not {timeout!r}")
        self.url = url
        self.prefix = prefix
        self.timeout = timeout
        tag = prefix if prefix.startswith("{") and prefix.endswith("}") else "{" + prefix + "}"
        self._p = tag + ":"
        self._rec = self._p + "c:"
        self._exp = self._p + "exp"
        self._stats = self._p + "stats"
        common: dict[str, Any] = {
            "socket_connect_timeout": timeout,
            "socket_timeout": None,  # every exchange is bounded by asyncio.timeout instead
            "retry": Retry(NoBackoff(), 0),
            "health_check_interval": 0,
            "decode_responses": True,  # hiredis decodes in C
        }
        try:
            self._client, self._where = self._make_client(url, timeout, sentinels, sentinel_service, common)
        except (ValueError, TypeError) as exc:  # a malformed URL or address
            raise StoreError(f"bad redis address {url!r}: {exc}") from None
        self._scripts: dict[str, AsyncScript] = {
            name: self._client.register_script(load_script_source(name)) for name in SCRIPTS
        }
        self._sha = {name: s.sha for name, s in self._scripts.items()}
        self._conn: AbstractConnection | None = None
        self._replies: tuple[asyncio.StreamReader, asyncio.StreamWriter, hiredis.Reader] | None = None
        self._queue: list[_Op] = []
        self._busy = False
        self._kicked = False
        self._closed = False
        self._inflight_since: float | None = None  # loop time the current round trip began
        # every op a caller waits for, oldest first, and one timer for the oldest's deadline
        # (a timer per op cost more than the rest of the client side)
        self._waiting: collections.deque[_Op] = collections.deque()
        self._watchdog: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[None] | None = None
        self._down_since: float | None = None
        # A round trip that takes this long means a hung connection: it is dropped. Callers do
        # not wait for it: each operation fails on its own deadline (`timeout`) regardless.
        self._exchange_timeout = timeout + 0.45
        self._key_cache: dict[tuple[str, str | None], str] = {}
        self._pair_cache: dict[tuple[str, str | None], tuple[str, str, str]] = {}
        self._index_cache: dict[str, str] = {}
        self._tokens = itertools.count()
        self._token_prefix = os.urandom(4).hex() + ":"
        self._undo_pending: list[tuple[str, str]] = []
        self.errors = 0
        self.batches = 0
        self.ops = 0
        self.undone = 0

    @staticmethod
    def _make_client(url: str, timeout: float, sentinels: list[str] | None, sentinel_service: str,
                     common: dict[str, Any]) -> tuple[RedisClient, str]:
        """The redis-py client (plain, or the primary found through Sentinel) and a label."""
        if url.startswith("redis+sentinel://") or sentinels:
            if url.startswith("redis+sentinel://"):
                hosts, service, db, username, password = parse_sentinel_url(url)
            else:
                hosts = [_hostport(s, 26379) for s in sentinels or []]
                service = sentinel_service
                p = urlsplit(url)
                db = int(p.path.strip("/") or 0) if p.path.strip("/").isdigit() else 0
                username, password = p.username, p.password
            sentinel = Sentinel(  # type: ignore[no-untyped-call]
                hosts, socket_timeout=timeout, socket_connect_timeout=timeout,
                sentinel_kwargs={"socket_timeout": timeout, "socket_connect_timeout": timeout,
                                 "retry": Retry(NoBackoff(), 0)},
            )
            client: RedisClient = sentinel.master_for(
                service, db=db, username=username, password=password, **common
            )
            return client, f"sentinel {service} via {','.join(f'{h}:{p}' for h, p in hosts)}"
        return Redis.from_url(url, **common), url.split("@")[-1]

    @classmethod
    def from_settings(cls, settings: Settings) -> RedisStore:
        """The store service.toml asks for (`store = "redis"` or a redis URL)."""
        store = settings.store
        url = store if store.startswith(("redis://", "rediss://", "unix://", "redis+sentinel://")) \
            else settings.redis_url
        return cls(
            url,
            prefix=settings.redis_prefix,
            timeout=settings.store_timeout,
            sentinels=list(settings.redis_sentinels) or None,
            sentinel_service=settings.redis_service,
        )

    # -- key names ---------------------------------------------------------------------

    def profile_key(self, profile: str, value: str | None) -> str:
        """The zset of one profile key."""
        cache = self._key_cache
        key = cache.get((profile, value))
        if key is None:
            if len(cache) >= KEY_CACHE:
                cache.clear()
            base = f"{self._p}k:{_esc(profile)}"
            key = cache[(profile, value)] = base if value is None else f"{base}={value}"
        return key

    def index_key(self, profile: str) -> str:
        """The set of a profile's non-empty keys."""
        key = self._index_cache.get(profile)
        if key is None:
            if len(self._index_cache) >= KEY_CACHE:
                self._index_cache.clear()
            key = self._index_cache[profile] = f"{self._p}i:{_esc(profile)}"
        return key

    def record_key(self, call_id: str) -> str:
        """The hash of one call."""
        return self._rec + call_id

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Connect and load the scripts; a Redis that is down now is not fatal (we reconnect)."""
        self._closed = False
        try:
            async with asyncio.timeout(max(self.timeout, 1.0)):
                conn = await self._connection()
                await self._load_scripts(conn)
        except Exception as exc:  # any failure here only means "not yet"
            await self._drop_connection()
            log.warning("redis_unavailable_at_start", where=self._where, error=_describe(exc))
            return
        log.info("redis_connected", where=self._where, prefix=self.prefix)

    async def close(self) -> None:
        """Fail what is queued, stop the flusher, disconnect."""
        self._closed = True
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        for op in [*self._waiting, *self._queue]:  # queued, or on a round trip cut short
            if not op.fut.done():
                op.fut.set_exception(StoreError("redis store closed"))
        self._waiting.clear()
        self._queue = []
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        self._task = None
        await self._drop_connection()
        with contextlib.suppress(Exception):
            await self._client.aclose()

    # -- the batching pipe ---------------------------------------------------------------

    async def _connection(self) -> AbstractConnection:
        conn = self._conn
        if conn is None:
            conn = self._conn = self._client.connection_pool.make_connection()  # type: ignore[no-untyped-call]
        if not conn.is_connected:
            self._replies = None
            await conn.connect()
            # Past the handshake (HELLO/AUTH/SELECT, done by redis-py), replies are parsed by a
            # hiredis reader of our own fed straight from the socket's stream: one await per
            # chunk instead of redis-py's per-reply coroutine chain (~15 us per reply here).
            stream = getattr(conn, "_reader", None)
            writer = getattr(conn, "_writer", None)
            if isinstance(stream, asyncio.StreamReader) and isinstance(writer, asyncio.StreamWriter):
                self._replies = (stream, writer, hiredis.Reader(replyError=ResponseError, encoding="utf-8"))
        return conn

    async def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        self._replies = None
        if conn is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(0.2):
                    await conn.disconnect(nowait=True)

    async def _load_scripts(self, conn: AbstractConnection) -> None:
        cmds = [("SCRIPT", "LOAD", s.script) for s in self._scripts.values()]
        for reply in await self._exchange(conn, cmds):
            if isinstance(reply, Exception):
                raise reply

    async def _exchange(self, conn: AbstractConnection, cmds: list[tuple[Any, ...]]) -> list[Any]:
        """Write every command in one go, then read every reply (errors as values)."""
        # hiredis packs in C: redis-py's pure-Python packer cost ~200 us per 30-argument EVALSHA
        data = b"".join([hiredis.pack_command(c) for c in cmds])
        out: list[Any] = []
        fast = self._replies
        if fast is None:
            await conn.send_packed_command(data, check_health=False)
            for _ in cmds:
                try:
                    out.append(await conn.read_response())
                except ResponseError as exc:
                    out.append(exc)
            return [_classify(r) for r in out]
        stream, writer, reader = fast
        writer.write(data)
        await writer.drain()
        n = len(cmds)
        while len(out) < n:
            reply = reader.gets()
            if reply is False:
                chunk = await stream.read(1 << 16)
                if not chunk:
                    raise ConnectionError("redis closed the connection")
                reader.feed(chunk)
                continue
            out.append(_classify(reply))
        return out

    async def _call(self, script: str, keys: Sequence[str], args: Sequence[str],
                    undo: tuple[str, str] | None = None) -> Any:
        """Queue one script call for the next round trip; its reply, or StoreError.

        The deadline fails the future (see `_watch`), it does not cancel the caller: a reply
        that arrived in time is used even when the busy event loop resumes the caller late.
        """
        if self._closed:
            raise StoreError("redis store closed")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        now = loop.time()
        op = _Op(("EVALSHA", self._sha[script], len(keys), *keys, *args), fut, undo, now)
        self._waiting.append(op)
        if self._watchdog is None:
            self._watchdog = loop.call_at(now + self.timeout, self._watch)
        self._enqueue(op, loop)
        return await fut

    def _enqueue(self, op: _Op, loop: asyncio.AbstractEventLoop) -> None:
        self._queue.append(op)
        if not self._busy and not self._kicked:
            self._kicked = True
            loop.call_soon(self._kick)

    def _watch(self) -> None:
        """Deadlines: fail the ops whose `timeout` passed, if Redis is late and not our loop.

        Redis is late when the round trip in flight (the op's own, or the one it waits behind)
        began more than `timeout` ago and none of its reply has arrived. A busy event loop
        (a burst of requests being decoded and answered) delays our reading of replies that
        Redis sent in time; such ops get a new look instead of a false "store down". An op
        queued for MAX_QUEUE_WAIT fails regardless (we are overloaded).
        """
        self._watchdog = None
        if self._closed:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        waiting = self._waiting
        while waiting and waiting[0].fut.done():
            waiting.popleft()
        late: bool | None = None  # computed at most once per look
        retry_soon = False
        for op in waiting:
            if op.born + self.timeout > now:
                break
            if op.fut.done():
                continue
            if now - op.born >= MAX_QUEUE_WAIT:
                self.errors += 1
                op.fut.set_exception(StoreError(f"redis store overloaded: queued {now - op.born:.3f} s"))
                continue
            if late is None:
                since = self._inflight_since
                late = since is not None and now - since >= self.timeout
                if late and self._reply_pending():
                    late, retry_soon = False, True
            if late:
                self.errors += 1
                op.fut.set_exception(StoreError(f"redis ({self._where}) did not answer within "
                                                f"{self.timeout * 1000:.0f} ms"))
        while waiting and waiting[0].fut.done():
            waiting.popleft()
        if not waiting:
            return
        due = waiting[0].born + self.timeout
        if due > now:
            at = due
        elif retry_soon:
            at = now + 0.001
        else:  # the head is due but Redis is not late: look when the round trip in flight would be
            since = self._inflight_since
            at = since + self.timeout if since is not None and since + self.timeout > now \
                else now + self.timeout / 5
        self._watchdog = loop.call_at(max(at, now + 0.0005), self._watch)

    def _reply_pending(self) -> bool:
        """Whether Redis's reply has arrived and only waits for us to read it."""
        conn = self._conn
        if conn is None:
            return False
        try:
            reader = getattr(conn, "_reader", None)
            if reader is not None and len(getattr(reader, "_buffer", b"")) > 0:
                return True
            writer = getattr(conn, "_writer", None)
            sock = writer.get_extra_info("socket") if writer is not None else None
            if sock is None:
                return False
            readable, _, _ = select.select([sock.fileno()], [], [], 0)
            return bool(readable)
        except (OSError, ValueError, AttributeError, TypeError):
            return False

    def _undo(self, undo: tuple[str, str]) -> None:
        """Release what a reserve admitted when its caller never saw the answer (too late, or
        the round trip failed after it was sent): the service decided that call without the
        store (store-error policy), so its slot must not stay held. Only the admission made
        by that very reserve (its token) is released, never a call admitted otherwise."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        call_id, token = undo

        def done(f: asyncio.Future[Any]) -> None:
            if f.cancelled() or f.exception() is not None:
                self._keep_undo(undo)  # Redis still away: try again after the next success
            elif f.result() == 1:
                self.undone += 1
                log.warning("redis_unanswered_reserve_released", call_id=call_id)

        fut.add_done_callback(done)
        keys = self._base(call_id)
        self._enqueue(_Op(("EVALSHA", self._sha["end"], len(keys), *keys,
                           "0", self._rec, call_id, "", "1", token), fut), loop)

    def _keep_undo(self, undo: tuple[str, str]) -> None:
        if len(self._undo_pending) < MAX_PENDING_UNDO:
            self._undo_pending.append(undo)

    def _kick(self) -> None:
        self._kicked = False
        if self._busy or not self._queue or self._closed:
            return
        self._busy = True
        self._task = asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        try:
            while self._queue and not self._closed:
                queue = self._queue
                self._queue = queue[MAX_BATCH:]
                batch = [op for op in queue[:MAX_BATCH] if not op.fut.done()]
                if batch:
                    await self._send(batch)
        finally:
            self._busy = False
            if self._queue and not self._closed and not self._kicked:
                self._kicked = True
                asyncio.get_running_loop().call_soon(self._kick)

    async def _send(self, batch: list[_Op]) -> None:
        """One round trip for the batch; resolves every future, never raises."""
        self.batches += 1
        self.ops += len(batch)
        err: StoreError | None = None
        results: list[Any] = []
        loop = asyncio.get_running_loop()
        self._inflight_since = loop.time()
        sent = False  # once written, a reserve may have run even if its answer is lost
        try:
            async with asyncio.timeout(self._exchange_timeout):
                conn = await self._connection()
                sent = True
                results = await self._exchange(conn, [op.cmd for op in batch])
                retry = [i for i, r in enumerate(results) if isinstance(r, NoScriptError)]
                if retry:  # Redis restarted or SCRIPT FLUSH: load them again, retry once
                    log.info("redis_scripts_reloaded", where=self._where)
                    await self._load_scripts(conn)
                    again = await self._exchange(conn, [batch[i].cmd for i in retry])
                    for i, r in zip(retry, again, strict=True):
                        results[i] = r
        except TimeoutError:
            err = StoreError(f"redis ({self._where}) did not answer within "
                             f"{self._exchange_timeout * 1000:.0f} ms: connection dropped")
        except (RedisError, OSError) as exc:
            err = StoreError(f"redis ({self._where}) unavailable: {_describe(exc)}")
        except Exception as exc:  # a store raises nothing but StoreError
            err = StoreError(f"redis ({self._where}) failed: {_describe(exc)}")
        finally:
            self._inflight_since = None
        if err is not None:
            await self._drop_connection()
            self.errors += 1
            if self._down_since is None:
                self._down_since = asyncio.get_running_loop().time()
                log.warning("redis_down", where=self._where, error=str(err))
            for op in batch:
                if sent and op.undo is not None:  # it may have run before the connection failed
                    self._keep_undo(op.undo)
                if not op.fut.done():
                    op.fut.set_exception(err)
            return
        if self._down_since is not None:
            log.info("redis_up", where=self._where,
                     down_for=round(asyncio.get_running_loop().time() - self._down_since, 3))
            self._down_since = None
        readonly = False
        for op, res in zip(batch, results, strict=True):
            if op.fut.done():
                if op.undo is not None and isinstance(res, list) and res and res[0] == 1:
                    self._undo(op.undo)
                continue
            if isinstance(res, Exception):
                readonly = readonly or isinstance(res, ReadOnlyError)
                op.fut.set_exception(StoreError(f"redis ({self._where}) refused: {_describe(res)}"))
            else:
                op.fut.set_result(res)
        if readonly:  # a failover demoted our primary: reconnect (Sentinel finds the new one)
            await self._drop_connection()
        elif self._undo_pending:  # a few per round trip, so a backlog never delays checks
            pending = self._undo_pending[:UNDO_PER_BATCH]
            del self._undo_pending[:UNDO_PER_BATCH]
            for undo in pending:
                self._undo(undo)

    # -- decoding ----------------------------------------------------------------------

    @staticmethod
    def _record(flat: Sequence[Any]) -> CallRecord:
        try:
            it = iter(flat)
            h = dict(zip(it, it, strict=False))
            d = orjson.loads(h["d"])
            return CallRecord(
                call_id=str(d["id"]),
                from_uri=str(d["f"]),
                to_uri=str(d["t"]),
                account=str(d["a"]),
                state=h["s"],
                init_ts=float(d["i"]),
                start_ts=float(h["st"]) if h.get("st") else None,
                timeout=float(h["to"]),
                expires=float(h["e"]),
                profiles=[(str(p), None if v is None else str(v)) for p, v in d["p"]],
            )
        except (KeyError, TypeError, ValueError, IndexError, orjson.JSONDecodeError) as exc:
            raise StoreError(f"malformed call record in redis: {exc!r}") from None

    def _maybe_record(self, reply: Any) -> CallRecord | None:
        if not reply:
            return None
        if not isinstance(reply, list):
            raise StoreError(f"unexpected reply from redis: {reply!r}")
        return self._record(reply)

    def _base(self, call_id: str) -> list[str]:
        return [self.record_key(call_id), self._exp, self._stats]

    # -- operations --------------------------------------------------------------------

    def _key_pair(self, key: tuple[str, str | None]) -> tuple[str, str, str]:
        """A profile key's zset, what reserve.lua takes as its index (the zset itself for a key
        without value), and its piece of the record's `k` field."""
        pair = self._pair_cache.get(key)
        if pair is None:
            if len(self._pair_cache) >= KEY_CACHE:
                self._pair_cache.clear()
            zset = self.profile_key(*key)
            index = "" if key[1] is None else self.index_key(key[0])
            piece = f"{len(zset.encode())}:{zset}{len(index.encode())}:{index}"
            pair = self._pair_cache[key] = (zset, index or zset, piece)
        return pair

    def reserve_command(
        self, call: CallInfo, plan: Sequence[PlanEntry], now: float, timeout: float
    ) -> tuple[list[str], list[str], list[tuple[str, str | None]], list[int]]:
        """KEYS and ARGV of reserve.lua for this call (also used by the benchmark), the distinct
        profile keys, and for each plan entry the position of its key among them."""
        # (hot path: ~7 us; every check pays it)
        distinct: dict[tuple[str, str | None], int] = {}
        slots: list[int] = []
        checks: list[str] = []
        zsets: list[str] = []
        indexes: list[str] = []
        pieces: list[str] = []
        cache = self._pair_cache
        for i, e in enumerate(plan):
            key = (e.profile, e.value)
            slot = distinct.get(key)
            if slot is None:
                slot = distinct[key] = len(zsets)
                pair = cache.get(key) or self._key_pair(key)
                zsets.append(pair[0])
                indexes.append(pair[1])
                pieces.append(pair[2])
            slots.append(slot)
            if e.limit is not None and not e.shadow:
                checks += (str(i), str(slot + 1), str(e.limit))
        profiles = list(distinct)
        cid = call.call_id
        static = orjson.dumps({"id": cid, "f": call.from_uri, "t": call.to_uri, "a": call.account,
                               "i": now, "p": profiles}).decode()
        keys = [self._rec + cid, self._exp, self._stats, *zsets, *indexes]
        args = [repr(now), self._rec, repr(now + timeout), repr(timeout), cid, static,
                "".join(pieces), str(len(zsets)), str(len(checks) // 3),
                f"{self._token_prefix}{next(self._tokens)}", *checks]
        return keys, args, profiles, slots

    async def reserve(
        self, call: CallInfo, plan: Sequence[PlanEntry], now: float, timeout: float
    ) -> ReserveResult:
        """Admit the call into every key of the plan, or into none (reserve.lua)."""
        now, timeout = float(now), float(timeout)  # repr() of a float is what Lua parses back
        keys, args, profiles, slots = self.reserve_command(call, plan, now, timeout)
        reply = await self._call("reserve", keys, args, undo=(call.call_id, args[9]))
        n = len(profiles)
        try:
            status, blocked = int(reply[0]), int(reply[1])
            sizes = [int(reply[2 + slot]) for slot in slots]
        except (TypeError, ValueError, IndexError) as exc:
            raise StoreError(f"unexpected reserve reply from redis: {exc!r}") from None
        if status == 2:
            return ReserveResult(True, True, None, sizes, self._record(reply[2 + n :]))
        if status == 0:
            return ReserveResult(False, False, blocked, sizes, None)
        rec = CallRecord(
            call_id=call.call_id,
            from_uri=call.from_uri,
            to_uri=call.to_uri,
            account=call.account,
            state="early",
            init_ts=now,
            start_ts=None,
            timeout=timeout,
            expires=now + timeout,
            profiles=profiles,
        )
        return ReserveResult(True, False, None, sizes, rec)

    async def answer(self, call_id: str, now: float, timeout: float) -> CallRecord | None:
        """Mark a held call answered with a new lease (answer.lua)."""
        reply = await self._call("answer", self._base(call_id),
                                 [_num(now), self._rec, _num(now + timeout), _num(timeout), call_id])
        return self._maybe_record(reply)

    async def refresh(self, call_id: str, now: float, timeout: float) -> CallRecord | None:
        """Extend a held call's lease (refresh.lua)."""
        reply = await self._call("refresh", self._base(call_id),
                                 [_num(now), self._rec, _num(now + timeout), _num(timeout), call_id])
        return self._maybe_record(reply)

    async def end(self, call_id: str, now: float, reason: str) -> CallRecord | None:
        """Release a held call (end.lua)."""
        counter = "failed" if reason in FAILED_REASONS else "expired" if reason == "timeout" else ""
        reply = await self._call("end", self._base(call_id), [_num(now), self._rec, call_id, counter, ""])
        return self._maybe_record(reply)

    async def get_call(self, call_id: str, now: float) -> CallRecord | None:
        """The record of a held call (get.lua)."""
        reply = await self._call("get", self._base(call_id), [_num(now), self._rec, call_id])
        return self._maybe_record(reply)

    def _subject(self, profile: str, value: str | None) -> tuple[list[str], str]:
        if value is None:
            return [self.profile_key(profile, None), self._exp, self._stats, self.index_key(profile)], "profile"
        return [self.profile_key(profile, value), self._exp, self._stats], "key"

    async def profile_size(self, profile: str, value: str | None, now: float) -> int:
        """Calls in the key, or in every value of the profile, cluster-wide (size.lua)."""
        keys, mode = self._subject(profile, value)
        reply = await self._call("size", keys, [_num(now), self._rec, mode])
        try:
            return int(reply)
        except (TypeError, ValueError):
            raise StoreError(f"unexpected size reply from redis: {reply!r}") from None

    async def profile_list(self, profile: str, value: str | None, now: float) -> list[CallRecord]:
        """The calls in the key (or every value of the profile), ordered by Call-ID (list.lua)."""
        keys, mode = self._subject(profile, value)
        reply = await self._call("list", keys, [_num(now), self._rec, mode])
        if not isinstance(reply, list):
            raise StoreError(f"unexpected list reply from redis: {reply!r}")
        return sorted((self._record(r) for r in reply), key=lambda r: r.call_id)

    async def stats(self, now: float) -> DialogStats:
        """Dialog statistics of every instance sharing this Redis and prefix (stats.lua)."""
        for _ in range(MAX_ROUNDS):
            reply = await self._call("stats", [self._stats, self._exp, self._stats],
                                     [_num(now), self._rec, str(SWEEP_BATCH)])
            try:
                early, active, processed, expired, failed, left = (int(x) for x in reply)
            except (TypeError, ValueError) as exc:
                raise StoreError(f"unexpected stats reply from redis: {exc!r}") from None
            if left == 0:
                break
        return DialogStats(
            active_dialogs=max(active, 0),
            early_dialogs=max(early, 0),
            processed_dialogs=processed,
            expired_dialogs=expired,
            failed_dialogs=failed,
        )

    async def sweep(self, now: float) -> int:
        """Drop every call whose lease ended by `now`, cluster-wide (sweep.lua)."""
        total = 0
        for _ in range(MAX_ROUNDS):
            reply = await self._call("sweep", [self._exp, self._exp, self._stats],
                                     [_num(now), self._rec, str(SWEEP_BATCH)])
            try:
                dropped, left = int(reply[0]), int(reply[1])
            except (TypeError, ValueError, IndexError) as exc:
                raise StoreError(f"unexpected sweep reply from redis: {exc!r}") from None
            total += dropped
            if left == 0:
                break
        return total


def _classify(reply: Any) -> Any:
    """Error replies as redis-py's exception classes (NOSCRIPT and READONLY matter here)."""
    if isinstance(reply, ResponseError) and not isinstance(reply, NoScriptError | ReadOnlyError):
        text = str(reply)
        if text.startswith("NOSCRIPT"):
            return NoScriptError(text)
        if text.startswith("READONLY"):
            return ReadOnlyError(text)
    return reply


def _consume(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
