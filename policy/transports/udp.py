"""UDP transport: one JSON object per datagram, the answer one datagram back.

UDP cannot prove where a datagram came from (a source address is trivially spoofed), so:

- only datagrams from `udp_allow` networks are read (loopback by default); the rest are
  dropped without an answer, counted, and logged at most once per interval;
- a UDP peer holds the `proxy` role, never more: admin ops are refused by the service;
- an answer is never larger than its request, so the service cannot amplify a spoofed
  flood toward a victim: an answer that does not fit loses its lists and objects (`profiles`,
  `shadow`, an error's message), and if it still does not fit becomes a bare
  `{"ok":false,"error":{"code":"too_big"}}`, or nothing. A client that wants whole answers
  pads its requests (unknown fields are ignored) or uses TCP. See docs/security.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from typing import Any, cast

import structlog

from policy.auth import Allowlist, Peer
from policy.ratelimit_log import RateLimitedLog
from policy.service import PolicyService
from policy.transports import eager
from policy.wire import BadMessage, Framing, decode_datagram, encode

log = structlog.get_logger("policy.transports.udp")
UDP_RCVBUF = 4 * 1024 * 1024
LOOPBACK = ("127.0.0.0/8", "::1/128")
_ECHO = ("id", "tindex", "tlabel")


def bounded_reply(reply: dict[str, Any], framing: Framing, limit: int) -> bytes | None:
    """The bytes of `reply` in at most `limit` bytes: whole, else without its lists and objects, else
    a bare `too_big` error; None when even that does not fit."""
    out = encode(reply, framing)
    if len(out) <= limit:
        return out
    return _shrunk(reply, framing, limit)


def _shrunk(reply: dict[str, Any], framing: Framing, limit: int) -> bytes | None:
    compact = {k: v for k, v in reply.items() if not isinstance(v, (list, dict))}
    err = reply.get("error")
    if isinstance(err, dict) and "code" in err:
        compact["error"] = {"code": err["code"]}
    out = encode(compact, framing)
    if len(out) <= limit:
        return out
    bare: dict[str, Any] = {k: reply[k] for k in _ECHO if k in reply}
    bare["ok"] = False
    bare["error"] = {"code": "too_big"}
    out = encode(bare, framing)
    return out if len(out) <= limit else None


class DatagramProtocol(asyncio.DatagramProtocol):
    """Answers each datagram (from an allowed source) with one datagram no larger than it."""

    def __init__(self, service: PolicyService, max_message: int, allow: Allowlist | None = None,
                 warn: RateLimitedLog | None = None) -> None:
        self.service = service
        self.max_message = max_message
        self.allow = allow or Allowlist(LOOPBACK)
        self.warn = warn or RateLimitedLog(log)
        self.transport: asyncio.DatagramTransport | None = None
        self.received = 0
        self.bad = 0
        self.dropped = 0  # from a source outside udp_allow
        self.shrunk = 0  # answers cut down to fit the request's size
        self.unanswered = 0  # answers that could not fit at all
        self._peers: dict[Any, Peer] = {}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def info(self) -> dict[str, int]:
        """For `stats` (`udp`)."""
        return {"received": self.received, "bad": self.bad, "dropped": self.dropped, "shrunk": self.shrunk,
                "unanswered": self.unanswered}

    def datagram_received(self, data: bytes, addr: Any) -> None:
        host = str(addr[0]) if isinstance(addr, tuple) else str(addr)
        if not self.allow.allows(host):
            self.dropped += 1
            self.warn.warning("udp_dropped", peer=host, reason="source not in udp_allow", total_dropped=self.dropped)
            return
        self.received += 1
        size = len(data)
        event = decode_datagram(data, self.max_message)
        if isinstance(event, BadMessage):
            self.bad += 1
            self.warn.warning("bad_message", transport="udp", peer=host, code=event.code, error=event.message)
            self._send({"ok": False, "error": {"code": event.code, "message": event.message}},
                       event.framing, addr, size)
            return
        peer = self._peers.get(addr)
        if peer is None:
            # UDP cannot prove where a datagram came from: proxy ops only (docs/security.md).
            # One Peer per source address (nothing changes it: UDP cannot `auth`), bounded.
            peer = Peer("udp", f"{host}:{addr[1]}" if isinstance(addr, tuple) else host, "proxy")
            if len(self._peers) >= 4096:
                self._peers.clear()
            self._peers[addr] = peer
        done, result = eager.starter(self.service.store.answers_inline)(
            self.service.handle_payload(event.payload, peer))
        if done:
            self._send(result, event.framing, addr, size)
        else:
            result.add_done_callback(lambda t: self._send(t.result(), event.framing, addr, size))

    def _send(self, reply: dict[str, Any], framing: Framing, addr: Any, limit: int) -> None:
        out = encode(reply, framing)
        if len(out) > limit:
            small = _shrunk(reply, framing, limit)
            if small is None:
                self.unanswered += 1
                return
            self.shrunk += 1
            out = small
        if self.transport is not None and not self.transport.is_closing():
            self.transport.sendto(out, addr)

    def error_received(self, exc: Exception) -> None:
        self.warn.warning("udp_error", error=str(exc))


async def serve_udp(service: PolicyService, host: str, port: int, max_message: int,
                    reuse_port: bool = False, allow: Allowlist | None = None,
                    warn: RateLimitedLog | None = None) -> tuple[asyncio.DatagramTransport, DatagramProtocol]:
    """Listen on UDP."""
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.create_datagram_endpoint(
        lambda: DatagramProtocol(service, max_message, allow, warn), local_addr=(host, port),
        reuse_port=reuse_port or None,
    )
    sock = transport.get_extra_info("socket")
    if sock is not None:
        # bursts from many proxies must not overflow the default ~200 KiB receive buffer
        # (each datagram costs ~2 KiB of it); the kernel caps this at net.core.rmem_max
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, UDP_RCVBUF)
    return transport, protocol
