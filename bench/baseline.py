"""The smallest honest server of callpolicy's line protocol: what this machine and Python do
for the same work with nothing else in the way. `make bench` runs it beside the service with
the same load generator and prints every service figure as a ratio to it.

Same protocol (one JSON object per line over TCP or a Unix socket, replies in order,
pipelining; one object per UDP datagram), same libraries (asyncio.Protocol, uvloop, orjson).
`check` counts the call in three dict counters (total, account, user@domain) and enforces a
cap on the last two (account 10, acme 3; user 4: the shipped rules' caps); `end` releases by
call id; `answer` marks a held call answered; `ping`. Replies have the service's shape, so
the same reply checker accepts them: `{"id":..,"ok":true,"decision":"allow","profiles":[..]}`,
`{"ok":true,"decision":"deny","code":486,...}`, `{"ok":true,"released":true}`, errors as
`{"ok":false,"error":{"code":..,"message":..}}`. No rules engine, no leases, no logging, no
snapshots, no metrics: the floor the service's work sits on.

    .venv/bin/python bench/baseline.py --tcp 127.0.0.1:5199 [--udp 127.0.0.1:5199] [--unix PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
from typing import Any

import orjson

USER_CAP = 4
ACCOUNT_CAP = 10
ACCOUNT_OVERRIDES = {"acme": 3}


class Counters:
    """Three dict counters and the calls holding them."""

    def __init__(self) -> None:
        self.total = 0
        self.accounts: dict[str, int] = {}
        self.users: dict[str, int] = {}
        self.calls: dict[str, tuple[str, str | None, bool]] = {}  # call id -> user, account, answered

    def handle(self, msg: Any) -> dict[str, Any]:
        """One request, one reply."""
        if not isinstance(msg, dict):
            return {"ok": False, "error": {"code": "invalid_json", "message": "not a JSON object"}}
        reply: dict[str, Any] = {"id": msg["id"]} if "id" in msg else {}
        op = msg.get("op")
        cid = msg.get("call_id")
        if op == "ping":
            reply.update(ok=True, pong=True)
            return reply
        if op not in ("check", "end", "answer"):
            reply.update(ok=False, error={"code": "unknown_op", "message": f"unknown op {op!r}"})
            return reply
        if not isinstance(cid, str) or not cid:
            reply.update(ok=False, error={"code": "missing_field", "message": "'call_id' is required"})
            return reply
        if op == "end":
            held = self.calls.pop(cid, None)
            if held is not None:
                self._drop(held[0], held[1])
            reply.update(ok=True, released=held is not None)
            return reply
        if op == "answer":
            held = self.calls.get(cid)
            if held is not None:
                self.calls[cid] = (held[0], held[1], True)
            reply.update(ok=True, found=held is not None, state="active" if held else None)
            return reply
        frm = msg.get("from")
        user = frm[4:] if isinstance(frm, str) and frm.startswith("sip:") else str(frm)
        account = msg.get("account")
        if account is not None and not isinstance(account, str):
            reply.update(ok=False, error={"code": "bad_field", "message": "'account' must be a string"})
            return reply
        if cid in self.calls:
            reply.update(ok=True, decision="allow", duplicate=True, profiles=[], shadow=[])
            return reply
        u = self.users.get(user, 0)
        a = self.accounts.get(account, 0) if account else 0
        a_cap = ACCOUNT_OVERRIDES.get(account, ACCOUNT_CAP) if account else 0
        if account and a >= a_cap:
            reply.update(ok=True, decision="deny", code=486, reason="Account call limit reached",
                         rule="account-cap", profiles=[], shadow=[])
            return reply
        if u >= USER_CAP:
            reply.update(ok=True, decision="deny", code=486, reason="User call limit reached", rule="user-cap",
                         profiles=[], shadow=[])
            return reply
        self.total += 1
        self.users[user] = u + 1
        profiles = [{"profile": "total", "value": None, "size": self.total},
                    {"profile": "user", "value": user, "size": u + 1, "limit": USER_CAP}]
        if account:
            self.accounts[account] = a + 1
            profiles.append({"profile": "account", "value": account, "size": a + 1, "limit": a_cap})
        self.calls[cid] = (user, account, False)
        reply.update(ok=True, decision="allow", profiles=profiles, shadow=[])
        return reply

    def _drop(self, user: str, account: str | None) -> None:
        self.total -= 1
        n = self.users[user] - 1
        if n:
            self.users[user] = n
        else:
            del self.users[user]
        if account:
            n = self.accounts[account] - 1
            if n:
                self.accounts[account] = n
            else:
                del self.accounts[account]


class LineProtocol(asyncio.Protocol):
    """Line-framed JSON over a stream; every reply of one read goes out in one write."""

    def __init__(self, counters: Counters) -> None:
        self.counters = counters
        self.buf = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family != socket.AF_UNIX:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        end = buf.rfind(b"\n")
        if end < 0:
            self.buf = buf
            return
        self.buf = buf[end + 1:]
        handle = self.counters.handle
        out = []
        for line in buf[:end].split(b"\n"):
            if not line.strip():
                continue
            try:
                msg = orjson.loads(line)
            except orjson.JSONDecodeError:
                msg = None
            out.append(orjson.dumps(handle(msg)))
        if out and self.transport is not None:
            out.append(b"")
            self.transport.write(b"\n".join(out))


class DatagramProtocol(asyncio.DatagramProtocol):
    """One JSON object per datagram, the reply one datagram back."""

    def __init__(self, counters: Counters) -> None:
        self.counters = counters
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        with contextlib.suppress(OSError):
            transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        try:
            msg = orjson.loads(data)
        except orjson.JSONDecodeError:
            msg = None
        if self.transport is not None:
            self.transport.sendto(orjson.dumps(self.counters.handle(msg)), addr)


def _hostport(value: str) -> tuple[str, int]:
    host, port = value.rsplit(":", 1)
    return host or "127.0.0.1", int(port)


async def serve(tcp: str | None, udp: str | None, unix: str | None) -> None:
    """Listen until SIGTERM/SIGINT."""
    loop = asyncio.get_running_loop()
    counters = Counters()
    closers = []
    if tcp:
        closers.append(await loop.create_server(lambda: LineProtocol(counters), *_hostport(tcp)))
    if unix:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(unix)
        closers.append(await loop.create_unix_server(lambda: LineProtocol(counters), unix))
    if udp:
        transport, _ = await loop.create_datagram_endpoint(lambda: DatagramProtocol(counters),
                                                           local_addr=_hostport(udp))
        closers.append(transport)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(orjson.dumps({"event": "listening", "pid": os.getpid(), "tcp": tcp, "udp": udp, "unix": unix}).decode(),
          flush=True)
    await stop.wait()
    for c in closers:
        c.close()


def main(argv: list[str] | None = None) -> int:
    """Run the baseline server."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tcp", help="HOST:PORT")
    ap.add_argument("--udp", help="HOST:PORT")
    ap.add_argument("--unix", help="socket path")
    args = ap.parse_args(argv)
    try:
        import uvloop

        uvloop.run(serve(args.tcp, args.udp, args.unix))
    except ImportError:  # pragma: no cover
        asyncio.run(serve(args.tcp, args.udp, args.unix))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
