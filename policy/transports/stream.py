"""TCP and Unix stream transport: netstring or line-framed JSON, pipelined, answered in order."""

from __future__ import annotations

import asyncio
import collections
import contextlib
from typing import Any, cast

import structlog

from policy.auth import Peer
from policy.errors import ProtocolError
from policy.service import PolicyService
from policy.transports import eager
from policy.wire import Framing, StreamDecoder, encode

log = structlog.get_logger("policy.transports.stream")


class ConnectionStats:
    """Counts shared by every connection of a listener."""

    def __init__(self, max_connections: int) -> None:
        self.max_connections = max_connections
        self.open = 0
        self.accepted = 0
        self.refused = 0
        self.protocol_errors = 0


class StreamProtocol(asyncio.Protocol):
    """One client connection."""

    def __init__(self, service: PolicyService, stats: ConnectionStats, *, max_message: int,
                 partial_timeout: float, name: str = "tcp", role: str | None = "admin") -> None:
        self.service = service
        self.role = role
        self.stats = stats
        self.name = name
        self.decoder = StreamDecoder(max_message)
        self.partial_timeout = partial_timeout
        self.transport: asyncio.Transport | None = None
        # replies in request order: [reply or None while its task runs, framing]
        self.pending: collections.deque[list[Any]] = collections.deque()
        self.peer: Any = None
        self.closing = False
        self.counted = False
        self._flush_soon = False
        self._partial_timer: asyncio.TimerHandle | None = None
        self.loop = asyncio.get_running_loop()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.peer = transport.get_extra_info("peername") or self.name
        addr = self.peer
        where = f"{addr[0]}:{addr[1]}" if isinstance(addr, tuple) and len(addr) >= 2 else str(addr)
        self.client = Peer(self.name, where, self.role)
        st = self.stats
        if st.open >= st.max_connections:
            st.refused += 1
            log.warning("connection_refused", transport=self.name, peer=str(self.peer),
                        reason="max_connections", limit=st.max_connections)
            self.transport.write(encode({"ok": False, "error": {"code": "busy",
                                    "message": "too many connections"}}, Framing.LINE))
            self.closing = True
            transport.close()
            return
        st.open += 1
        st.accepted += 1
        self.counted = True

    def connection_lost(self, exc: Exception | None) -> None:
        if self._partial_timer is not None:
            self._partial_timer.cancel()
        if self.counted:
            self.counted = False
            self.stats.open -= 1
        self.transport = None

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        dec = self.decoder
        dec.receive_data(data)
        handle = self.service.handle_payload
        client = self.client
        start = eager.starter(self.service.store.answers_inline)
        while True:
            try:
                event = dec.next_event()
            except ProtocolError as exc:
                self._fatal(exc)
                return
            if event is None:
                break
            done, result = start(handle(event.payload, client))
            if done:
                self.pending.append([result, event.framing])
            else:
                slot: list[Any] = [None, event.framing]
                self.pending.append(slot)
                result.add_done_callback(lambda t, slot=slot: self._on_done(slot, t))
        self._flush()
        self._arm_partial_timer()

    def eof_received(self) -> bool:
        """The client half-closed (`nc` at end of input): answer what is pending, then close."""
        if self.decoder.buffered and not self.closing:
            self._fatal(ProtocolError("truncated", "the stream ended inside a message"))
            return True
        self.closing = True
        if not self.pending and self.transport is not None:
            self.transport.close()
        return True

    def _on_done(self, slot: list[Any], task: asyncio.Future[dict[str, Any]]) -> None:
        slot[0] = task.result()
        if not self._flush_soon:
            # the replies of one store round trip complete together: one write for all of them
            self._flush_soon = True
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        """Write every reply that is ready at the head of the queue, in one write."""
        self._flush_soon = False
        pending = self.pending
        out = []
        while pending and pending[0][0] is not None:
            reply, framing = pending.popleft()
            out.append(encode(reply, framing))
        if out and self.transport is not None:
            self.transport.write(b"".join(out))
        if self.closing and not pending and self.transport is not None:
            self.transport.close()

    def _fatal(self, exc: ProtocolError) -> None:
        self.stats.protocol_errors += 1
        log.warning("protocol_error", transport=self.name, peer=str(self.peer), code=exc.code,
                    error=exc.message)
        self.closing = True
        # a stream that cannot be resynchronised: answer after what came before, then close
        self.pending.append([{"ok": False, "error": {"code": exc.code, "message": exc.message}},
                             Framing.NETSTRING if exc.code == "bad_netstring" else Framing.LINE])
        self._flush()

    def _arm_partial_timer(self) -> None:
        if self._partial_timer is not None:
            self._partial_timer.cancel()
            self._partial_timer = None
        if self.decoder.buffered and not self.closing:
            self._partial_timer = self.loop.call_later(self.partial_timeout, self._partial_expired)

    def _partial_expired(self) -> None:
        self._partial_timer = None
        if self.transport is None or not self.decoder.buffered:
            return
        self._fatal(ProtocolError("timeout", f"incomplete message for {self.partial_timeout:g} s"))


async def serve_tcp(service: PolicyService, host: str, port: int, stats: ConnectionStats, *,
                    max_message: int, partial_timeout: float, reuse_port: bool = False) -> asyncio.Server:
    """Listen on TCP."""
    loop = asyncio.get_running_loop()
    return await loop.create_server(
        lambda: StreamProtocol(service, stats, max_message=max_message, partial_timeout=partial_timeout),
        host, port, reuse_port=reuse_port or None,
    )


async def serve_unix(service: PolicyService, path: str, stats: ConnectionStats, *,
                     max_message: int, partial_timeout: float) -> asyncio.Server:
    """Listen on a Unix stream socket (a stale socket file is replaced, a live one is refused)."""
    import os

    loop = asyncio.get_running_loop()
    if os.path.exists(path):
        claim_unix_path(path)
    return await loop.create_unix_server(
        lambda: StreamProtocol(service, stats, max_message=max_message, partial_timeout=partial_timeout,
                               name="unix"),
        path,
    )


def claim_unix_path(path: str) -> None:
    """Remove a stale socket file at `path`; OSError if a running process still accepts on it."""
    import os
    import socket

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
