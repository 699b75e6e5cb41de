"""TCP and Unix stream transport: netstring or line-framed JSON, pipelined, answered in order.

Connection-level policy lives here, request-level policy in the service:

- who the peer is (`identify`): a TCP connection starts admin (no token configured: loopback
  only) or with no role until it sends `auth`; a Unix peer gets its role from its uid
  (SO_PEERCRED) or sends `auth` too;
- bounds per client: `max_connections` (the Unix socket has `unix_reserve` more, so the admin
  CLI always gets in), `max_per_peer` TCP connections per source address, an idle timeout, a
  deadline for an incomplete message counted from its first byte (one byte now and then does
  not keep it open), and back-pressure (`policy.transports.flow`): at most `max_pending`
  unanswered requests, and no reading while the client does not read its replies;
- warnings a client can cause go through a rate-limited log (one line per interval).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import math
import os
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import structlog

from policy.auth import Peer, UnixAccess
from policy.errors import ProtocolError
from policy.ratelimit_log import RateLimitedLog
from policy.service import PolicyService
from policy.transports import eager
from policy.transports.flow import HIGH_WATER, FlowControl
from policy.wire import Framing, StreamDecoder, encode

log = structlog.get_logger("policy.transports.stream")
_CRED = struct.Struct("3i")  # struct ucred: pid, uid, gid

Identify = Callable[[asyncio.BaseTransport], Peer]


@dataclass(frozen=True, slots=True)
class StreamLimits:
    """Per-connection bounds (`[protocol]` in service.toml)."""

    max_message: int = 64 * 1024
    partial_timeout: float = 10.0
    idle_timeout: float = 600.0  # 0: none
    max_pending: int = 256
    high_water: int = HIGH_WATER


class ConnectionStats:
    """Counts and caps shared by every stream connection (TCP and Unix) of the service."""

    def __init__(self, max_connections: int, max_per_peer: int | None = None, unix_reserve: int = 16,
                 warn: RateLimitedLog | None = None) -> None:
        self.max_connections = max_connections
        self.max_per_peer = max_per_peer if max_per_peer is not None else max_connections
        self.unix_reserve = unix_reserve
        self.open = 0
        self.per_peer: collections.Counter[str] = collections.Counter()
        self.accepted = 0
        self.refused = 0
        self.refused_by: collections.Counter[str] = collections.Counter()
        self.protocol_errors = 0
        self.idle_closed = 0
        self.read_pauses = 0
        self.peak_pending = 0  # most replies one connection held unwritten
        self.peak_write_buffer = 0  # largest transport write buffer seen after a write
        self.connections: set[StreamProtocol] = set()
        self.warn = warn or RateLimitedLog(log)

    def admit(self, transport: str, host: str) -> str | None:
        """Why a new connection is refused, or None to accept it."""
        if transport == "unix":
            if self.open >= self.max_connections + self.unix_reserve:
                return "max_connections"
            return None
        if self.open >= self.max_connections:
            return "max_connections"
        if self.per_peer[host] >= self.max_per_peer:
            return "max_per_peer"
        return None

    def info(self) -> dict[str, Any]:
        """For `stats` (`connections`)."""
        return {"open": self.open, "accepted": self.accepted, "refused": self.refused,
                "refused_by": dict(self.refused_by), "protocol_errors": self.protocol_errors,
                "idle_closed": self.idle_closed, "read_pauses": self.read_pauses,
                "peak_pending": self.peak_pending}


_BUSY = {
    "max_connections": "too many connections",
    "max_per_peer": "too many connections from this address",
}


class StreamProtocol(asyncio.Protocol):
    """One client connection."""

    def __init__(self, service: PolicyService, stats: ConnectionStats, limits: StreamLimits,
                 identify: Identify, name: str = "tcp") -> None:
        self.service = service
        self.stats = stats
        self.limits = limits
        self.identify = identify
        self.name = name
        self.max_pending = limits.max_pending
        self.decoder = StreamDecoder(limits.max_message)
        self.transport: asyncio.Transport | None = None
        self.flow: FlowControl | None = None
        # replies in request order: [reply or None while its task runs, framing]
        self.pending: collections.deque[list[Any]] = collections.deque()
        # replies encoded at once (nothing was pending ahead of them), to write before `pending`
        self.ready: list[bytes] = []
        self.client = Peer(name)
        self.host = ""
        self.closing = False  # no more requests will be read: close once the replies are out
        self.eof = False
        self.counted = False
        self._scheduled = False
        self.loop = asyncio.get_running_loop()
        self._last_active = self.loop.time()
        self._partial_since: float | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf

    # -- connection life ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = tr = cast(asyncio.Transport, transport)
        self.client = self.identify(transport)
        addr = transport.get_extra_info("peername")
        self.host = str(addr[0]) if isinstance(addr, tuple) and addr else ""
        st = self.stats
        reason = st.admit(self.name, self.host)
        if reason is not None:
            st.refused += 1
            st.refused_by[reason] += 1
            st.warn.warning("connection_refused", transport=self.name, peer=self.client.address, reason=reason,
                            limit=st.max_per_peer if reason == "max_per_peer" else st.max_connections,
                            total_refused=st.refused)
            tr.write(encode({"ok": False, "error": {"code": "busy", "message": _BUSY[reason]}}, Framing.LINE))
            self.closing = True
            tr.close()
            return
        st.open += 1
        st.accepted += 1
        if self.name != "unix":
            st.per_peer[self.host] += 1
        st.connections.add(self)
        self.counted = True
        self.flow = FlowControl(tr, self.limits.high_water)
        if self.limits.idle_timeout > 0:
            self._arm(self._last_active + self.limits.idle_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.counted:
            self.counted = False
            st = self.stats
            st.open -= 1
            st.connections.discard(self)
            if self.name != "unix":
                st.per_peer[self.host] -= 1
                if st.per_peer[self.host] <= 0:
                    del st.per_peer[self.host]
            if self.flow is not None:
                st.read_pauses += self.flow.pauses
        self.transport = None

    def pause_writing(self) -> None:
        if self.flow is not None:
            self.flow.pause_writing()

    def resume_writing(self) -> None:
        if self.flow is not None:
            self.flow.resume_writing()
            self._last_active = self.loop.time()  # the client is reading
            self._schedule()

    # -- reading --------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        self._last_active = self.loop.time()
        self.decoder.receive_data(data)
        self._process()

    def eof_received(self) -> bool:
        """The client half-closed (`nc` at end of input): answer what is pending, then close."""
        self.eof = True
        self._process()
        return True

    def _schedule(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            self.loop.call_soon(self._process)

    def _process(self) -> None:
        """Answer the complete messages buffered, as far as the bounds allow; then decide whether
        to read on."""
        self._scheduled = False
        if self.closing or self.transport is None or self.flow is None:
            self._flush()
            return
        flow = self.flow
        dec = self.decoder
        pending = self.pending
        ready = self.ready
        cap = self.max_pending
        handle = self.service.handle_payload
        client = self.client
        start = eager.starter(self.service.store.answers_inline)
        budget = cap  # requests per loop turn: other connections get their turn
        progressed = drained = blocked = False
        while True:
            if flow.write_paused:
                blocked = True
                break
            if len(pending) >= cap:
                self._flush()
                if len(pending) >= cap or flow.write_paused:
                    blocked = True
                    break
            if not budget:
                break
            try:
                events = dec.next_events(min(budget, cap - len(pending)))
            except ProtocolError as exc:
                self._fatal(exc)
                return
            if not events:
                drained = True
                break
            budget -= len(events)
            progressed = True
            for payload, framing in events:
                done, result = start(handle(payload, client))
                if not done:
                    slot: list[Any] = [None, framing]
                    pending.append(slot)
                    result.add_done_callback(lambda t, slot=slot: self._on_done(slot, t))
                elif pending:  # behind a reply still being worked out
                    pending.append([result, framing])
                else:  # answered at once with nothing ahead of it: encoded now, written below
                    ready.append(encode(result, framing))
        self._flush()
        if self.transport is None or self.closing:
            return
        if not drained:
            flow.pause_reading()  # bounded: nothing more is read until these are answered
            if not blocked:
                self._schedule()  # the budget ran out: go on after the other ready callbacks
            return
        if self.eof:
            if dec.buffered:
                self._fatal(ProtocolError("truncated", "the stream ended inside a message"))
            else:
                self.closing = True
                self._flush()
            return
        flow.resume_reading()
        if dec.buffered:
            if progressed or self._partial_since is None:
                # a new message began: its deadline counts from now, not from each later byte
                self._partial_since = now = self.loop.time()
                self._arm(now + self.limits.partial_timeout)
        else:
            self._partial_since = None

    def _on_done(self, slot: list[Any], task: asyncio.Future[dict[str, Any]]) -> None:
        slot[0] = task.result()
        # the replies of one store round trip complete together: one write for all of them
        self._schedule()

    # -- writing --------------------------------------------------------------------------

    def _flush(self) -> None:
        """Write every reply that is ready (those encoded at once, then the ones at the head of
        the queue), in one write."""
        pending = self.pending
        out = self.ready
        st = self.stats
        held = len(out) + len(pending)
        if held > st.peak_pending:
            st.peak_pending = held
        while pending and pending[0][0] is not None:
            reply, framing = pending.popleft()
            out.append(encode(reply, framing))
        tr = self.transport
        if tr is None:
            out.clear()
            return
        if out:
            tr.write(out[0] if len(out) == 1 else b"".join(out))
            out.clear()
            size = tr.get_write_buffer_size()
            if size > st.peak_write_buffer:
                st.peak_write_buffer = size
        if self.closing and not pending:
            tr.close()

    def _fatal(self, exc: ProtocolError) -> None:
        self.stats.protocol_errors += 1
        self.stats.warn.warning("protocol_error", transport=self.name, peer=self.client.address, code=exc.code,
                                error=exc.message)
        self.closing = True
        # a stream that cannot be resynchronised: answer after what came before, then close
        self.pending.append([{"ok": False, "error": {"code": exc.code, "message": exc.message}},
                             Framing.NETSTRING if exc.code == "bad_netstring" else Framing.LINE])
        self._flush()

    # -- deadlines ------------------------------------------------------------------------

    def _arm(self, at: float) -> None:
        """Make sure the timer fires no later than `at` (one timer per connection, re-armed lazily)."""
        if self._timer is not None:
            if self._timer_at <= at:
                return
            self._timer.cancel()
        self._timer_at = at
        self._timer = self.loop.call_at(at, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = math.inf
        tr = self.transport
        if tr is None or self.closing:
            return
        now = self.loop.time()
        nxt = math.inf
        if self._partial_since is not None:
            deadline = self._partial_since + self.limits.partial_timeout
            if now >= deadline:
                self._partial_since = None
                self._fatal(ProtocolError("timeout", f"incomplete message for {self.limits.partial_timeout:g} s"))
                return
            nxt = deadline
        idle = self.limits.idle_timeout
        if idle > 0:
            deadline = self._last_active + idle
            if now >= deadline:
                if any(slot[0] is None for slot in self.pending):
                    deadline = now + idle  # the store is still answering: not idle
                else:
                    self._close_idle(tr, idle)
                    return
            nxt = min(nxt, deadline)
        if nxt < math.inf:
            self._arm(nxt)

    def _close_idle(self, tr: asyncio.Transport, idle: float) -> None:
        self.stats.idle_closed += 1
        stuck = tr.get_write_buffer_size() > 0
        self.stats.warn.info("connection_idle_closed", transport=self.name, peer=self.client.address,
                             idle_timeout=idle, unread_replies=stuck)
        self.closing = True
        if stuck:
            tr.abort()  # the client has not read its replies for idle_timeout: close() would wait forever
        else:
            tr.close()


def _tcp_identify(role: str | None) -> Identify:
    def identify(transport: asyncio.BaseTransport) -> Peer:
        addr = transport.get_extra_info("peername")
        where = f"{addr[0]}:{addr[1]}" if isinstance(addr, tuple) and len(addr) >= 2 else str(addr)
        return Peer("tcp", where, role)

    return identify


def peer_uid(transport: asyncio.BaseTransport) -> tuple[int | None, int | None]:
    """(pid, uid) of a Unix socket peer, from the kernel (SO_PEERCRED); Nones where unknown."""
    sock = transport.get_extra_info("socket")
    opt = getattr(socket, "SO_PEERCRED", None)
    if sock is None or opt is None:
        return None, None
    try:
        pid, uid, _gid = _CRED.unpack(sock.getsockopt(socket.SOL_SOCKET, opt, _CRED.size))
    except (OSError, AttributeError, struct.error):
        return None, None
    return pid, uid


def _unix_identify(access: UnixAccess) -> Identify:
    def identify(transport: asyncio.BaseTransport) -> Peer:
        pid, uid = peer_uid(transport)
        role = access.role_for(uid)
        return Peer("unix", f"uid={uid} pid={pid}", role, name=f"uid:{uid}" if role else "")

    return identify


async def serve_tcp(service: PolicyService, host: str, port: int, stats: ConnectionStats, *,
                    limits: StreamLimits, role: str | None, reuse_port: bool = False) -> asyncio.Server:
    """Listen on TCP; new connections start with `role` (None: they must `auth` first)."""
    loop = asyncio.get_running_loop()
    identify = _tcp_identify(role)
    return await loop.create_server(
        lambda: StreamProtocol(service, stats, limits, identify), host, port, reuse_port=reuse_port or None,
    )


def bind_unix(path: str, mode: int = 0o660, group: int | None = None) -> socket.socket:
    """A Unix stream socket bound at `path`, never more open than `mode` at any moment."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        old = os.umask(0o177)  # the file is created 0600, then opened up to `mode`
        try:
            sock.bind(path)
        finally:
            os.umask(old)
        if group is not None:
            os.chown(path, -1, group)
        os.chmod(path, mode)
    except OSError:
        sock.close()
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
    return sock


async def serve_unix(service: PolicyService, path: str, stats: ConnectionStats, *, limits: StreamLimits,
                     access: UnixAccess, mode: int = 0o660, group: int | None = None) -> asyncio.Server:
    """Listen on a Unix stream socket created with `mode`/`group` (a stale socket file is
    replaced, a live one is refused)."""
    loop = asyncio.get_running_loop()
    if os.path.exists(path):
        claim_unix_path(path)
    sock = bind_unix(path, mode, group)
    identify = _unix_identify(access)
    return await loop.create_unix_server(
        lambda: StreamProtocol(service, stats, limits, identify, name="unix"), sock=sock,
    )


def claim_unix_path(path: str) -> None:
    """Remove a stale socket file at `path`; OSError if a running process still accepts on it."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        pass  # nobody listens: a stale file left by a killed process
    except OSError as exc:  # a full backlog (timeout), no permission...: not ours to remove
        raise OSError(f"unix socket {path} is in use by a running service ({exc})") from None
    else:
        raise OSError(f"unix socket {path} is in use by a running service (it accepts connections)")
    finally:
        probe.close()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
