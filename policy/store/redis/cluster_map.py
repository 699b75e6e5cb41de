"""Redis Cluster topology for the store: the slot map, one connection per primary, routing.

No redis-py on the request path (the single-node store's reasons, measured again for the
cluster in docs/redis.md): each primary gets the single-node store's own `Circuit` (reconnect
with backoff, fail fast while down) and `Pipe` (one write per event-loop tick, deadlines that
measure Redis, not our loop). This module adds what a cluster needs:

- **The slot map** from ``CLUSTER SLOTS``, asked of a primary we are connected to, else of the
  seed nodes (``redis+cluster://host:port,host:port`` or ``[store] cluster = [...]``), else of
  any node the last map named. Refreshed every `REFRESH_INTERVAL`, and at once (at most every
  `MIN_REFRESH`) after a redirect, a ``CLUSTERDOWN``, or a connection to a primary going down.
- **Primaries only.** Commands go to the primary that owns the slot; each connection checks
  ``ROLE`` before it is used (`prepare`). Replicas are never connected to: decisions are never
  made on a replica's possibly stale copy.
- **Redirects.** ``MOVED slot host:port``: the slot's owner changed (a failover, a reshard): the
  map is updated for that slot at once, refreshed in full, and the command sent again to the
  new owner. ``ASK slot host:port`` (a slot being migrated): ``ASKING`` and the command to that
  node, once. ``TRYAGAIN`` (the keys of one script are split by a migration in progress): sent
  again after 5 ms while the operation's deadline allows. At most `MAX_REDIRECTS` per command.
- **Failovers.** When a refresh shows a slot served by a node that the previous map listed as a
  replica of its owner, `on_change` is told (the store then repairs what the old primary may
  have acknowledged without replicating).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Awaitable, Callable, Sequence
from typing import Any
from urllib.parse import unquote, urlsplit

import hiredis

from policy.errors import StoreError
from policy.store.redis.cluster_layout import SLOTS
from policy.store.redis.connection import (
    Address,
    Circuit,
    ReplyError,
    RespConnection,
    Target,
    _hostport,
    connect,
    roundtrip,
)
from policy.store.redis.pipe import Pipe

#: Seconds between two refreshes of the slot map when nothing asks for one.
REFRESH_INTERVAL = 1.0
#: The least time between two refreshes (redirects and failures ask for one each).
MIN_REFRESH = 0.05
#: Redirects (MOVED, ASK, TRYAGAIN) one command follows at most.
MAX_REDIRECTS = 5
#: Pause before a command answered TRYAGAIN is sent again.
TRYAGAIN_PAUSE = 0.005

SCHEME = "redis+cluster://"


def parse_cluster_url(url: str) -> tuple[list[tuple[str, int]], str | None, str | None]:
    """``redis+cluster://[[user]:password@]host:port[,host:port...]`` as (seeds, user, password)."""
    if not url.startswith(SCHEME):
        raise StoreError(f"bad redis cluster address {url!r}: use {SCHEME}host:port[,host:port...]")
    parts = urlsplit(url)
    netloc = parts.netloc
    user = password = None
    if "@" in netloc:
        cred, netloc = netloc.rsplit("@", 1)
        if ":" in cred:
            u, pw = cred.split(":", 1)
            user, password = unquote(u) or None, unquote(pw)
        else:
            password = unquote(cred)
    if parts.path.strip("/") not in ("", "0"):
        raise StoreError(f"redis cluster address {url!r}: a cluster has only database 0")
    seeds = parse_seeds([h for h in netloc.split(",") if h.strip()], url)
    return seeds, user, password


def parse_seeds(hosts: Sequence[str], where: str = "[store] cluster") -> list[tuple[str, int]]:
    """host:port strings as (host, port) pairs (port 6379 when missing)."""
    seeds = [_hostport(h, 6379) for h in hosts if h.strip()]
    if not seeds:
        raise StoreError(f"no cluster node in {where!r}")
    for host, port in seeds:
        if not host or not 0 < port < 65536:
            raise StoreError(f"bad cluster node address {host}:{port} in {where!r}")
    return seeds


def reply_error(exc: BaseException) -> ReplyError | None:
    """The Redis error reply behind a StoreError (set by the pipe), if any."""
    cause = exc.__cause__
    return cause if isinstance(cause, ReplyError) else None


class NodeLink:
    """One primary: its address, its cluster node id, a Circuit and a Pipe."""

    def __init__(self, cmap: ClusterMap, host: str, port: int, node_id: str) -> None:
        self.cmap = cmap
        self.host, self.port, self.node_id = host, port, node_id
        self.address = Address(host, port)
        target = Target(self.address, username=cmap.username, password=cmap.password)
        self.circuit = Circuit(target, connect_timeout=cmap.connect_timeout, prepare=self._prepare,
                               attach=self._attach, log=cmap.log)
        self.pipe = Pipe(self.circuit, timeout=cmap.timeout, hang_timeout=max(cmap.timeout + 0.45, 0.5),
                         undo_command=_no_undo, reload_commands=cmap.reload_commands, on_undone=_ignore_undone,
                         on_broken=cmap.request_refresh)
        self.closed = False

    def __repr__(self) -> str:
        return f"{self.host}:{self.port}"

    async def _prepare(self, conn: RespConnection) -> None:
        (role,) = await roundtrip(conn, [("ROLE",)])
        if isinstance(role, ReplyError) or not role or role[0] != "master":
            self.cmap.request_refresh()
            raise StoreError(f"{self} is not a primary (ROLE {role!r}): never used for decisions")
        await self.cmap.prepare(self, conn)

    def _attach(self, conn: RespConnection) -> None:
        self.pipe.attach(conn)

    @property
    def up(self) -> bool:
        """Whether commands can be sent now."""
        return self.circuit.state == "up" and not self.closed

    def start(self) -> None:
        """Start connecting in the background."""
        self.pipe.closed = False
        self.circuit.start()

    async def close(self) -> None:
        """Fail what waits, stop reconnecting."""
        self.closed = True
        self.pipe.close()
        await self.circuit.close()


class ClusterMap:
    """The slot map and the connections to the primaries; see the module docstring."""

    def __init__(self, seeds: Sequence[tuple[str, int]], *, username: str | None, password: str | None,
                 timeout: float, connect_timeout: float, log: Any,
                 prepare: Callable[[NodeLink, RespConnection], Awaitable[None]],
                 reload_commands: Callable[[], list[bytes]],
                 on_change: Callable[[bool, str], None]) -> None:
        self.seeds = list(seeds)
        self.username, self.password = username, password
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.log = log
        self.prepare = prepare
        self.reload_commands = reload_commands
        self.on_change = on_change
        self.slots: list[NodeLink | None] = [None] * SLOTS
        self.links: dict[tuple[str, int], NodeLink] = {}
        self._shape: tuple[Any, ...] = ()
        self._replicas: dict[str, set[str]] = {}  # primary id -> replica ids, as of the last map
        self._known: list[tuple[str, int]] = []  # every node the last map named
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing: set[asyncio.Task[None]] = set()
        #: Slots a replica took over since the store last looked (what a failover may have lost).
        self.failover_slots: set[int] = set()
        self.refreshes = 0
        self.refresh_failures = 0
        self.redirects = 0
        self.failovers = 0
        self.last_error = ""
        self.closed = False

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> bool:
        """First map (bounded by the connect timeout), connect to every primary, start refreshing.
        Whether the map is known (the cluster may be down: not fatal, refreshed in the background)."""
        self.closed = False
        try:
            async with asyncio.timeout(self.connect_timeout + 0.5):
                ok = await self.refresh()
        except TimeoutError:
            ok = False
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._loop())
        if ok:
            await asyncio.gather(*(link.circuit.first_attempt() for link in list(self.links.values())))
        return ok

    async def close(self) -> None:
        """Stop refreshing, close every connection."""
        self.closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None
        links = list(self.links.values())
        self.links.clear()
        self.slots = [None] * SLOTS
        await asyncio.gather(*(link.close() for link in links), return_exceptions=True)
        for task in list(self._closing):
            task.cancel()
        await asyncio.gather(*self._closing, return_exceptions=True)

    def request_refresh(self) -> None:
        """Refresh the map soon (at most every MIN_REFRESH)."""
        self._wake.set()

    async def _loop(self) -> None:
        while not self.closed:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(REFRESH_INTERVAL):
                    await self._wake.wait()
            self._wake.clear()
            try:
                async with asyncio.timeout(self.connect_timeout + 0.5):
                    await self.refresh()
            except TimeoutError:
                self.refresh_failures += 1
            except Exception as exc:  # never let the loop die
                self.refresh_failures += 1
                self.last_error = f"{type(exc).__name__}: {exc}"
            if any(not link.up for link in self.links.values()) or None in self.slots:
                await asyncio.sleep(MIN_REFRESH * random.uniform(1.0, 2.0))  # keep looking, not in step
                self._wake.set()
            else:
                await asyncio.sleep(MIN_REFRESH)

    # -- the map -----------------------------------------------------------------------------

    async def _ask_slots(self) -> tuple[list[Any], tuple[str, int]]:
        """CLUSTER SLOTS from a connected primary, else a seed, else a node the last map named."""
        loop = asyncio.get_running_loop()
        errors: list[str] = []
        for link in list(self.links.values()):
            if link.up:
                try:
                    reply = await link.pipe.call(_packed("CLUSTER", "SLOTS"), loop.time() + self.timeout)
                    if isinstance(reply, list) and reply:
                        return reply, (link.host, link.port)
                except StoreError as exc:
                    errors.append(f"{link}: {exc}")
        tried = set()
        for host, port in [*self.seeds, *self._known]:
            if (host, port) in tried:
                continue
            tried.add((host, port))
            conn: RespConnection | None = None
            try:
                async with asyncio.timeout(self.connect_timeout):
                    conn, _ = await connect(Target(Address(host, port), username=self.username,
                                                   password=self.password))
                    (reply,) = await roundtrip(conn, [("CLUSTER", "SLOTS")])
                if isinstance(reply, list) and reply:
                    return reply, (host, port)
                errors.append(f"{host}:{port}: {reply!r}")
            except (OSError, ConnectionError, TimeoutError, StoreError) as exc:
                errors.append(f"{host}:{port}: {exc or type(exc).__name__}")
            finally:
                if conn is not None:
                    conn.abort()
        raise StoreError("no cluster node gave the slot map: " + "; ".join(errors))

    async def refresh(self) -> bool:
        """Ask for the slot map and apply it; whether it worked."""
        try:
            reply, asked = await self._ask_slots()
            self._apply(reply, asked)
        except (StoreError, ValueError, TypeError, IndexError) as exc:
            self.refresh_failures += 1
            reason = str(exc)
            if reason != self.last_error:
                self.log.warning("redis_cluster_map_failed", error=reason)
            self.last_error = reason
            return False
        self.refreshes += 1
        self.last_error = ""
        return True

    def _apply(self, reply: list[Any], asked: tuple[str, int]) -> None:
        ranges: list[tuple[int, int, str, int, str]] = []
        replicas: dict[str, set[str]] = {}
        known: list[tuple[str, int]] = []
        for entry in reply:
            start, end = int(entry[0]), int(entry[1])
            host, port, node_id = _node(entry[2], asked)
            ranges.append((start, end, host, port, node_id))
            known.append((host, port))
            reps = replicas.setdefault(node_id, set())
            for r in entry[3:]:
                rhost, rport, rid = _node(r, asked)
                reps.add(rid)
                known.append((rhost, rport))
        ranges.sort()
        shape = tuple(ranges)
        self._known = list(dict.fromkeys(known))
        if shape == self._shape:
            for node_id, reps in replicas.items():  # replicas show up once they are in sync
                self._replicas.setdefault(node_id, set()).update(reps)
            return
        old = self.slots
        slots: list[NodeLink | None] = [None] * SLOTS
        used: dict[tuple[str, int], NodeLink] = {}
        for start, end, host, port, node_id in ranges:
            link = self.links.get((host, port))
            if link is None or link.closed:
                link = NodeLink(self, host, port, node_id)
                self.links[(host, port)] = link
                if not self.closed:
                    link.start()
            link.node_id = node_id
            used[(host, port)] = link
            slots[start:end + 1] = [link] * (end - start + 1)
        failover = False
        moved = 0
        if self._shape:
            primary_ids = {r[4] for r in self._shape}
            for s in range(SLOTS):
                was, now = old[s], slots[s]
                if was is not now:
                    moved += 1
                    # a replica of the old owner took the slot over (or, not knowing its replicas,
                    # a node that served no slot while the old owner was unreachable)
                    if was is not None and now is not None and (
                            now.node_id in self._replicas.get(was.node_id, ())
                            or (not was.up and now.node_id not in primary_ids)):
                        failover = True
                        self.failover_slots.add(s)
        self.slots = slots
        first = not self._shape
        self._shape = shape
        for node_id, reps in self._replicas.items():
            if node_id in replicas:
                replicas[node_id] |= reps - {node_id}
        self._replicas = replicas
        for addr, link in list(self.links.items()):
            if addr not in used:
                del self.links[addr]
                task = asyncio.get_running_loop().create_task(link.close())
                self._closing.add(task)
                task.add_done_callback(self._closing.discard)
        covered = sum(1 for s in slots if s is not None)
        primaries = ", ".join(f"{h}:{p} {a}-{b}" for a, b, h, p, _ in ranges)
        if first:
            self.log.info("redis_cluster_map", primaries=primaries, slots_covered=covered)
        else:
            if failover:
                self.failovers += 1
            self.log.warning("redis_cluster_map_changed", primaries=primaries, slots_moved=moved,
                             slots_covered=covered, failover=failover)
        self.on_change(failover, "failover" if failover else ("first map" if first else "slots moved"))

    def _link(self, host: str, port: int) -> NodeLink:
        link = self.links.get((host, port))
        if link is None or link.closed:
            link = NodeLink(self, host, port, "")
            self.links[(host, port)] = link
            link.start()
        return link

    # -- sending -----------------------------------------------------------------------------

    def send(self, slot: int, data: bytes, deadline: float | None = None) -> asyncio.Future[Any]:
        """Queue one packed command for the owner of `slot`: its reply's future. Raises StoreError
        at once when that primary cannot be asked now (no owner known, not connected)."""
        link = self.slots[slot]
        if link is None:
            self.request_refresh()
            raise StoreError(f"redis cluster: no primary known for slot {slot}")
        return link.pipe.call(data, deadline)

    async def call(self, slot: int, data: bytes, deadline: float | None = None) -> Any:
        """One command to the owner of `slot`, following redirects."""
        try:
            return await self.send(slot, data, deadline)
        except StoreError as exc:
            return await self.recover(exc, slot, data, deadline)

    async def recover(self, exc: StoreError, slot: int, data: bytes, deadline: float | None) -> Any:
        """What a command that failed with `exc` gets: its reply after following MOVED, ASK and
        TRYAGAIN (bounded), or StoreError."""
        loop = asyncio.get_running_loop()
        for _ in range(MAX_REDIRECTS):
            err = reply_error(exc)
            if err is None:
                raise exc
            code = err.code
            if code in ("MOVED", "ASK"):
                self.redirects += 1
                try:
                    _, at, where = str(err).split(" ")
                    host, _, port = where.rpartition(":")
                    link = self._link(host or "127.0.0.1", int(port))
                except ValueError:
                    raise exc from None
                if code == "MOVED":
                    self.slots[int(at)] = link
                    self.request_refresh()
                    try:
                        return await link.pipe.call(data, deadline)
                    except StoreError as again:
                        exc = again
                        continue
                try:
                    asking = link.pipe.call(_packed("ASKING"), deadline)
                    asking.add_done_callback(_consume)
                    return await link.pipe.call(data, deadline)
                except StoreError as again:
                    exc = again
                    continue
            if code == "TRYAGAIN" and (deadline is None or loop.time() + TRYAGAIN_PAUSE < deadline):
                await asyncio.sleep(TRYAGAIN_PAUSE)
                try:
                    return await self.send(slot, data, deadline)
                except StoreError as again:
                    exc = again
                    continue
            if code == "CLUSTERDOWN":
                self.request_refresh()
            raise exc
        raise exc

    def state(self) -> dict[str, Any]:
        """Health for `info()` (no I/O)."""
        owned: dict[str, int] = {}
        for link in self.slots:
            if link is not None:
                owned[str(link)] = owned.get(str(link), 0) + 1
        return {
            "primaries": {str(link): {"state": link.circuit.state, "node_id": link.node_id[:12],
                                      "slots": owned.get(str(link), 0), "reason": link.circuit.reason or None,
                                      "errors": link.pipe.errors, "ops": link.pipe.ops}
                          for link in self.links.values()},
            "slots_covered": sum(owned.values()),
            "map_refreshes": self.refreshes,
            "map_failures": self.refresh_failures,
            "redirects": self.redirects,
            "failovers": self.failovers,
        }


def _node(entry: Sequence[Any], asked: tuple[str, int]) -> tuple[str, int, str]:
    """(host, port, node id) of one node in a CLUSTER SLOTS entry ('' host: the node we asked)."""
    host = str(entry[0]) if entry[0] not in (None, "", "?") else asked[0]
    return host, int(entry[1]), str(entry[2]) if len(entry) > 2 else f"{host}:{entry[1]}"


def _packed(*cmd: Any) -> bytes:
    return bytes(hiredis.pack_command(cmd))


def _no_undo(uid: str, token: str) -> bytes:  # the cluster store undoes reserves itself
    raise AssertionError("the cluster store never parks undos in a pipe")


def _ignore_undone(uid: str, result: int) -> None:
    return None


def _consume(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()
