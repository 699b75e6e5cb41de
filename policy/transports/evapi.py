"""Kamailio evapi connector: the service connects to Kamailio's evapi module as a TCP client.

Kamailio's `evapi` module is the TCP server (`modparam("evapi", "bind_addr", ...)`); the
service opens one connection to every node in `settings.evapi_nodes` and keeps it open,
reconnecting with exponential backoff (0.1 s doubling, capped at
`settings.evapi_reconnect_max`) whenever Kamailio restarts or the connection drops.

Both directions are netstrings carrying JSON objects - the service's own protocol. Every
message goes to `PolicyService.handle`, which echoes `id`, `tindex` and `tlabel`, so a
`check` sent by `evapi_async_relay` comes back with what `t_continue` needs.

What gets a reply (decided here, documented in docs/kamailio.md):

- `answer`, `refresh` and `end` are notices from `event_route[dialog:*]`: they get **no**
  reply unless the message carries an `id` (a config that wants to see the result adds one).
  Nothing in Kamailio waits for them, and a reply would only wake the evapi dispatcher.
- every other op (`check`, `ping`, `stats`, ...) gets a reply, also when it failed
  (`ok: false` with `tindex`/`tlabel` echoed, so the suspended transaction is resumed and
  the config's fail-open/fail-closed switch decides).
- a frame that is not a JSON object is logged and dropped: it cannot name a transaction.

Replies are written as soon as each is ready (not in request order): `tindex`/`tlabel`
identify them. `TCP_NODELAY` is set on connect and `TCP_QUICKACK` after every read -
Kamailio does not set TCP_NODELAY on its side, and without the quick ACK its reply-less
writes wait for our delayed ACK (~20 ms per call).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, cast

import structlog

from policy import protocol as P
from policy.auth import Peer
from policy.errors import ProtocolError, RequestError
from policy.settings import split_hostport
from policy.wire import Framing, StreamDecoder, encode

log = structlog.get_logger("policy.transports.evapi")

NOTICE_OPS = frozenset({"answer", "refresh", "end"})
INITIAL_BACKOFF = 0.1
CONNECT_TIMEOUT = 5.0
_QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)


class _Service(Protocol):
    info_providers: dict[str, Callable[[], Any]]

    async def handle(self, req: P.Request, peer: Peer) -> dict[str, Any]: ...


class _Settings(Protocol):
    evapi_nodes: list[str]
    evapi_reconnect_max: float
    max_message: int


def needs_reply(req: P.Request) -> bool:
    """Whether a message from Kamailio gets a reply (notices only when they carry an `id`)."""
    return req.id is not None or req.op not in NOTICE_OPS


class EvapiProtocol(asyncio.Protocol):
    """One connection to one Kamailio evapi node."""

    def __init__(self, node: EvapiNode) -> None:
        self.node = node
        self.service = node.service
        self.decoder = StreamDecoder(node.max_message)
        self.transport: asyncio.Transport | None = None
        self.sock: Any = None
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.tasks: set[asyncio.Task[None]] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.sock = transport.get_extra_info("socket")
        if self.sock is not None:
            with contextlib.suppress(OSError, AttributeError):
                self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._quickack()

    def _quickack(self) -> None:
        if _QUICKACK is not None and self.sock is not None:
            with contextlib.suppress(OSError, AttributeError):
                self.sock.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        # requests in flight run to the end: a notice (answer/end) must still reach the store
        # even though its connection is gone; only the reply has nowhere to go
        self.transport = None
        if not self.closed.done():
            self.closed.set_result(None)

    def data_received(self, data: bytes) -> None:
        self._quickack()  # Linux clears QUICKACK again after a while: set it after every read
        dec = self.decoder
        dec.receive_data(data)
        while True:
            try:
                event = dec.next_event()
            except ProtocolError as exc:
                log.warning("evapi_protocol_error", node=self.node.name, code=exc.code, error=exc.message)
                self.node.protocol_errors += 1
                if self.transport is not None:
                    self.transport.close()  # reconnects: a fresh stream resynchronises
                return
            if event is None:
                return
            self.node.received += 1
            task = asyncio.ensure_future(self._answer(event.payload))
            if not task.done():
                self.tasks.add(task)
                task.add_done_callback(self.tasks.discard)

    async def _answer(self, payload: bytes) -> None:
        try:
            req = P.decode(payload)
        except RequestError as exc:
            # answered all the same: a bad check still names the transaction to resume
            echoed = P.echo_of(payload)
            log.warning("evapi_bad_message", node=self.node.name, code=exc.code, error=exc.message)
            self.node.bad_messages += 1
            if self.transport is not None and "tindex" in echoed:
                self.transport.write(encode(P.error(exc.code, exc.message, echoed), Framing.NETSTRING))
            return
        result = await self.service.handle(req, self.node.peer)
        if needs_reply(req) and self.transport is not None:
            self.transport.write(encode(result, Framing.NETSTRING))
            self.node.replied += 1


class EvapiNode:
    """Keeps one connection to a Kamailio evapi node open, reconnecting with backoff."""

    def __init__(self, service: _Service, name: str, max_message: int, reconnect_max: float) -> None:
        self.service = service
        self.name = name
        self.host, self.port = split_hostport(name)
        self.max_message = max_message
        self.reconnect_max = max(reconnect_max, INITIAL_BACKOFF)
        self.peer = Peer("evapi", name, "proxy", name=name, node=name)
        self.protocol: EvapiProtocol | None = None
        self.connected_since: float | None = None
        self.connects = 0
        self.received = 0
        self.replied = 0
        self.bad_messages = 0
        self.protocol_errors = 0
        self.last_error: str | None = None
        self.task: asyncio.Task[None] | None = None

    @property
    def connected(self) -> bool:
        return self.protocol is not None and self.protocol.transport is not None

    def info(self) -> dict[str, Any]:
        """What `stats` shows for this node."""
        return {
            "connected": self.connected,
            "since": self.connected_since,
            "connects": self.connects,
            "received": self.received,
            "replied": self.replied,
            "bad_messages": self.bad_messages,
            "protocol_errors": self.protocol_errors,
            "last_error": self.last_error,
        }

    async def run(self) -> None:
        """Connect, wait for the connection to drop, back off, again - until cancelled."""
        loop = asyncio.get_running_loop()
        backoff = INITIAL_BACKOFF
        failures = 0
        while True:
            try:
                _transport, proto = await asyncio.wait_for(
                    loop.create_connection(lambda: EvapiProtocol(self), self.host, self.port),
                    CONNECT_TIMEOUT)
            except (TimeoutError, OSError) as exc:
                self.last_error = str(exc) or type(exc).__name__
                failures += 1
                if failures == 1:  # log the first failure of a series, not every retry
                    log.warning("evapi_connect_failed", node=self.name, error=self.last_error,
                                retry_in=backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.reconnect_max)
                continue
            self.protocol = proto
            self.connects += 1
            self.connected_since = time.time()
            log.info("evapi_connected", node=self.name, connects=self.connects, failed_attempts=failures)
            failures = 0
            backoff = INITIAL_BACKOFF
            try:
                await proto.closed
            finally:
                self.protocol = None
                self.connected_since = None
            log.warning("evapi_disconnected", node=self.name, retry_in=backoff)
            await asyncio.sleep(backoff)

    async def close(self) -> None:
        """Stop reconnecting and close the connection."""
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.task
        proto = self.protocol
        if proto is not None and proto.transport is not None:
            proto.transport.close()


async def start_evapi(service: Any, settings: Any) -> Callable[[], Awaitable[None]]:
    """Connect to every node in `settings.evapi_nodes`; return the closer."""
    svc = cast(_Service, service)
    st = cast(_Settings, settings)
    nodes = [EvapiNode(svc, name, st.max_message, st.evapi_reconnect_max) for name in st.evapi_nodes]
    for node in nodes:
        node.task = asyncio.create_task(node.run(), name=f"evapi {node.name}")

    def info() -> dict[str, Any]:
        return {"connected": sum(1 for n in nodes if n.connected),
                "nodes": {n.name: n.info() for n in nodes}}

    svc.info_providers["evapi"] = info

    async def close() -> None:
        svc.info_providers.pop("evapi", None)
        await asyncio.gather(*(n.close() for n in nodes))
        log.info("evapi_stopped", nodes=[n.name for n in nodes])

    return close
