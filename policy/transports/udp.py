"""UDP transport: one JSON object per datagram, the answer one datagram back."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from typing import Any, cast

import structlog

from policy.auth import Peer
from policy.service import PolicyService
from policy.transports import eager
from policy.wire import BadMessage, decode_datagram, encode

log = structlog.get_logger("policy.transports.udp")
UDP_RCVBUF = 4 * 1024 * 1024


class DatagramProtocol(asyncio.DatagramProtocol):
    """Answers each datagram with one datagram."""

    def __init__(self, service: PolicyService, max_message: int) -> None:
        self.service = service
        self.max_message = max_message
        self.transport: asyncio.DatagramTransport | None = None
        self.received = 0
        self.bad = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.received += 1
        event = decode_datagram(data, self.max_message)
        if isinstance(event, BadMessage):
            self.bad += 1
            log.warning("bad_message", transport="udp", peer=str(addr), code=event.code, error=event.message)
            self._send({"ok": False, "error": {"code": event.code, "message": event.message}},
                       event.framing, addr)
            return
        # UDP cannot prove where a datagram came from: proxy ops only (docs/security.md)
        peer = Peer("udp", f"{addr[0]}:{addr[1]}" if isinstance(addr, tuple) else str(addr), "proxy")
        done, result = eager.starter(self.service.store.answers_inline)(
            self.service.handle_payload(event.payload, peer))
        if done:
            self._send(result, event.framing, addr)
        else:
            result.add_done_callback(lambda t: self._send(t.result(), event.framing, addr))

    def _send(self, reply: dict[str, Any], framing: Any, addr: Any) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.sendto(encode(reply, framing), addr)

    def error_received(self, exc: Exception) -> None:
        log.warning("udp_error", error=str(exc))


async def serve_udp(service: PolicyService, host: str, port: int, max_message: int,
                    reuse_port: bool = False) -> tuple[asyncio.DatagramTransport, DatagramProtocol]:
    """Listen on UDP."""
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.create_datagram_endpoint(
        lambda: DatagramProtocol(service, max_message), local_addr=(host, port),
        reuse_port=reuse_port or None,
    )
    sock = transport.get_extra_info("socket")
    if sock is not None:
        # bursts from many proxies must not overflow the default ~200 KiB receive buffer
        # (each datagram costs ~2 KiB of it); the kernel caps this at net.core.rmem_max
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, UDP_RCVBUF)
    return transport, protocol
