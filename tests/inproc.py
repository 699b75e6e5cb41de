"""An in-process `Server` on real loopback sockets with a manual clock, configured per test."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from policy.clock import ManualClock
from policy.server import Server
from policy.service import PolicyService
from policy.settings import Settings, parse_tokens
from tests.helpers import ROOT, free_port
from tests.test_service import AClient

ADMIN = "admin-secret-0123456789abcdef"
PROXY = "proxy-secret-0123456789abcdef"
TOKENS = [{"name": "ops", "role": "admin", "secret": ADMIN}, {"name": "kamailio-1", "role": "proxy", "secret": PROXY}]
#: `tokens=` for `serving`: an admin token and a proxy token
WITH_TOKENS = parse_tokens("test", "auth.tokens", TOKENS)


@dataclass
class Served:
    """A running in-process service."""

    server: Server
    clock: ManualClock
    port: int
    unix: str
    rules: Path

    @property
    def service(self) -> PolicyService:
        """The service."""
        assert self.server.service is not None
        return self.server.service

    async def tcp(self, source: str | None = None) -> AClient:
        """A TCP client (optionally from another loopback source address, e.g. 127.0.0.2)."""
        local = (source, 0) if source else None
        return AClient(*await asyncio.open_connection("127.0.0.1", self.port, local_addr=local))

    async def unix_client(self) -> AClient:
        """A Unix socket client."""
        return await AClient.unix(self.unix)

    async def udp(self, payload: bytes, source: str = "127.0.0.1", wait: float = 2.0) -> bytes | None:
        """Send one datagram from `source`; the answer, or None if none came within `wait`."""
        return await udp_exchange(self.port, payload, source, wait)


async def udp_exchange(port: int, payload: bytes, source: str = "127.0.0.1", wait: float = 2.0) -> bytes | None:
    """One datagram to 127.0.0.1:port from `source`, and its answer (None after `wait` seconds)."""
    loop = asyncio.get_running_loop()
    got: asyncio.Future[bytes] = loop.create_future()

    class Proto(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr: Any) -> None:
            if not got.done():
                got.set_result(data)

    transport, _ = await loop.create_datagram_endpoint(Proto, local_addr=(source, 0),
                                                       remote_addr=("127.0.0.1", port), family=socket.AF_INET)
    try:
        transport.sendto(payload)
        try:
            return await asyncio.wait_for(got, wait)
        except TimeoutError:
            return None
    finally:
        transport.close()


@contextlib.asynccontextmanager
async def serving(tmp_path: Path, **overrides: Any) -> AsyncIterator[Served]:
    """The shipped rules on TCP, UDP and a Unix socket, with `overrides` applied to the Settings."""
    rules = tmp_path / "rules"
    if not rules.exists():
        shutil.copytree(ROOT / "rules", rules)
    port = free_port()
    unix = str(tmp_path / "s.sock")
    kw: dict[str, Any] = {"tcp": f"127.0.0.1:{port}", "udp": f"127.0.0.1:{port}", "unix": unix,
                          "rules": str(rules), "snapshot": None, "watch": False, "metrics": None,
                          "base_dir": tmp_path}
    kw.update(overrides)
    clock = ManualClock()
    server = Server(Settings(**kw), clock=clock)
    await server.start()
    try:
        yield Served(server, clock, port, unix, rules)
    finally:
        await server.stop()


async def authed(client: AClient, secret: str) -> AClient:
    """Send `auth` and check it was accepted."""
    r = await client.call("auth", token=secret)
    assert r["ok"], r
    return client


def jline(msg: dict[str, Any]) -> bytes:
    """One JSON line."""
    return orjson.dumps(msg) + b"\n"
