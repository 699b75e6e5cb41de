"""RADIUS front end, the socket side: recvfrom -> `policy.radius.adapter` -> sendto.

Two asyncio UDP listeners (auth, default port 1812; acct, default 1813), or one when both
are the same address. What a packet means, what is dropped and what is answered is the
adapter's (`policy/radius/adapter.py`), the bytes are the codec's (`policy/radius/packet.py`),
the clients are `policy/radius/clients.py`; see docs/radius.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, Protocol, cast

import structlog
from pyrad.dictionary import Dictionary

from policy.errors import SettingsError
from policy.radius import DICTIONARY
from policy.radius import packet as pk
from policy.radius.adapter import EventLog, Mapping, RadiusAdapter, ServiceLike
from policy.radius.clients import ClientTable
from policy.settings import RadiusClient, split_hostport
from policy.transports import eager

log = structlog.get_logger("policy.transports.radius")

AUTH_PORT = 1812
ACCT_PORT = 1813
LOG_BURST = 20  # adapter warnings per second; the rest are only counted


class _Settings(Protocol):
    radius_auth: str | None
    radius_acct: str | None
    radius_clients: list[RadiusClient]
    radius_dictionary: str | None
    radius_mapping: dict[str, str]
    radius_replay_window: float
    radius_replay_entries: int
    source: str

    def path(self, p: str | None) -> Path | None: ...


class RateLimited:
    """An EventLog that lets at most `burst` warnings a second through (infos always)."""

    def __init__(self, target: EventLog, burst: int = LOG_BURST, clock: Callable[[], float] = time.monotonic) -> None:
        self.target = target
        self.burst = burst
        self.clock = clock
        self.second = 0
        self.count = 0

    def info(self, event: str, **kw: Any) -> None:
        """Logged."""
        self.target.info(event, **kw)

    def warning(self, event: str, **kw: Any) -> None:
        """Logged unless `burst` warnings were logged this second already."""
        now = int(self.clock())
        if now != self.second:
            self.second, self.count = now, 0
        self.count += 1
        if self.count <= self.burst:
            self.target.warning(event, **kw)


class RadiusProtocol(asyncio.DatagramProtocol):
    """One UDP socket: the auth port, the acct port, or both when they are the same address."""

    def __init__(self, adapter: RadiusAdapter, codes: frozenset[int], inline: bool) -> None:
        self.adapter = adapter
        self.codes = codes
        self.start = eager.starter(inline)
        self.transport: asyncio.DatagramTransport | None = None
        self.tasks: set[asyncio.Future[Any]] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def error_received(self, exc: Exception) -> None:
        log.warning("radius_socket_error", error=str(exc))

    def datagram_received(self, data: bytes, addr: Any) -> None:
        try:
            out = self.adapter.receive(data, addr[0], addr[1], self.codes)
        except Exception:  # a bug: never let it reach the loop
            log.exception("radius_internal_error", peer=str(addr))
            self.adapter.stats.c["errors"] += 1
            return
        if out is None:
            return
        if isinstance(out, bytes):
            self._send(out, addr)
            return
        done, result = self.start(cast(Coroutine[Any, Any, Any], out))
        if done:
            if result is not None:
                self._send(result, addr)
            return
        self.tasks.add(result)
        result.add_done_callback(functools.partial(self._finished, addr))

    def _finished(self, addr: Any, task: asyncio.Future[Any]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is None and task.result() is not None:
            self._send(task.result(), addr)

    def _send(self, data: bytes, addr: Any) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.sendto(data, addr)
            self.adapter.stats.c["answered"] += 1


def load_dictionary(settings: _Settings) -> Dictionary:
    """The configured dictionary, or the shipped one."""
    path = settings.path(settings.radius_dictionary) if settings.radius_dictionary else DICTIONARY
    try:
        return Dictionary(str(path))
    except Exception as exc:
        raise SettingsError(settings.source, "radius.dictionary", f"cannot load {path}: {exc}") from None


def make_adapter(service: ServiceLike, settings: _Settings, events: EventLog | None = None) -> RadiusAdapter:
    """The adapter the settings describe (dictionary, mapping, clients, replay window)."""
    dictionary = load_dictionary(settings)
    for needed in ("SIP-AVP", "Reply-Message"):
        if needed not in dictionary.attributes:
            raise SettingsError(settings.source, "radius.dictionary", f"does not define {needed}")
    mapping = Mapping(dictionary, dict(settings.radius_mapping), settings.source)
    clients = ClientTable(list(settings.radius_clients), settings.source)
    return RadiusAdapter(service, clients, mapping, pk.ReplyAttributes(dictionary),
                         replay_window=settings.radius_replay_window,
                         replay_entries=settings.radius_replay_entries,
                         events=events if events is not None else RateLimited(log))


async def start_radius(service: ServiceLike, settings: _Settings) -> tuple[Callable[[], Any], dict[str, str]]:
    """Open the RADIUS listeners; returns (closer, {"radius_auth": "host:port", ...})."""
    adapter = make_adapter(service, settings)
    clients = adapter.clients.clients
    if not clients:
        log.warning("radius_no_clients", note="every RADIUS packet will be dropped")
    for c in clients:
        if not c.require_message_authenticator:
            log.warning("radius_message_authenticator_not_required", client=c.name,
                        note="Access-Requests without Message-Authenticator are accepted from this client: "
                             "anyone who can send from its address can ask checks (docs/radius.md)")
    loop = asyncio.get_running_loop()
    wanted: dict[tuple[str, int], set[int]] = {}
    for code, value, default in ((pk.ACCESS_REQUEST, settings.radius_auth, AUTH_PORT),
                                 (pk.ACCOUNTING_REQUEST, settings.radius_acct, ACCT_PORT)):
        if value:
            wanted.setdefault(split_hostport(value, default), {pk.STATUS_SERVER}).add(code)
    inline = bool(getattr(service.store, "answers_inline", False))
    transports: list[asyncio.DatagramTransport] = []
    protocols: list[RadiusProtocol] = []
    where: dict[str, str] = {}
    try:
        for (host, port), codes in wanted.items():
            transport, proto = await loop.create_datagram_endpoint(
                functools.partial(RadiusProtocol, adapter, frozenset(codes), inline), local_addr=(host, port))
            transports.append(transport)
            protocols.append(proto)
            sock = transport.get_extra_info("sockname")
            for kind, served in (("auth", pk.ACCESS_REQUEST), ("acct", pk.ACCOUNTING_REQUEST)):
                if served in codes:
                    where[f"radius_{kind}"] = f"{sock[0]}:{sock[1]}"
    except BaseException:
        for t in transports:
            t.close()
        raise
    service.info_providers["radius"] = adapter.stats.to_json
    log.info("radius_listening", **where, clients=[c.name for c in clients],
             replay_window=settings.radius_replay_window)

    async def close() -> None:
        for t in transports:
            t.close()
        pending = [task for p in protocols for task in p.tasks]
        for task in pending:
            task.cancel()
        for task in pending:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    return close, where
