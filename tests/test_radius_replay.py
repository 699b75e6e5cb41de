"""The replay window over real UDP sockets, with the service in this process on a manual clock:
time moves without sleeping (30 s for the reply cache, the window, the replay memory)."""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest

from policy.clock import ManualClock
from policy.radius import packet as pk
from policy.radius.adapter import CACHE_TTL, SeenSet
from policy.service import PolicyService
from policy.settings import RadiusClient, Settings
from policy.store.embedded import EmbeddedStore
from policy.transports.radius import RateLimited, start_radius
from tests.helpers import RULES, free_port
from tests.test_radius import RADCLIENT, RADCLIENT_DICT, SECRET, needs_radclient

WINDOW = 300.0


@dataclass
class Live:
    clock: ManualClock
    service: PolicyService
    auth: int
    acct: int

    async def send(self, data: bytes, port: int | None = None, sock: socket.socket | None = None,
                   timeout: float = 0.5) -> bytes | None:
        """Send from `sock` (else a new socket: a new source port); the reply or None."""
        loop = asyncio.get_running_loop()
        own = sock is None
        s = sock or socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            s.setblocking(False)
            await loop.sock_sendto(s, data, ("127.0.0.1", port or self.acct))
            try:
                return await asyncio.wait_for(loop.sock_recv(s, 8192), timeout)
            except TimeoutError:
                return None
        finally:
            if own:
                s.close()

    async def size(self, account: str = "acme") -> int:
        return await self.service.store.profile_size("account", account, self.clock.now())

    async def expires(self, call_id: str) -> float:
        rec = await self.service.store.get_call(call_id, self.clock.now())
        assert rec is not None
        return rec.expires

    def stats(self) -> dict[str, Any]:
        r: dict[str, Any] = self.service.info_providers["radius"]()
        return r


@pytest.fixture
async def live() -> AsyncIterator[Live]:
    clock = ManualClock()
    store = EmbeddedStore(clock=clock.now)
    service = PolicyService(RULES, store, clock=clock, default_timeout=3600.0)
    s = Settings()
    auth, acct = free_port(), free_port()
    s.radius_auth, s.radius_acct = f"127.0.0.1:{auth}", f"127.0.0.1:{acct}"
    s.radius_clients = [RadiusClient("127.0.0.1", SECRET, "reject", "lo")]
    s.radius_replay_window = WINDOW
    await store.start()
    close, _where = await start_radius(service, s)
    try:
        yield Live(clock, service, auth, acct)
    finally:
        await close()
        await store.close()


def acct(clock: ManualClock, call_id: str, status: int, *, ts: bool = True, **more: int) -> bytes:
    attrs = [(40, struct.pack("!I", status)), (1, b"acme"), (44, call_id.encode())]
    if ts:
        attrs.append((55, struct.pack("!I", int(clock.now()))))
    attrs += [({"session_time": 46, "delay": 41}[k], struct.pack("!I", v)) for k, v in more.items()]
    return pk.request(pk.ACCOUNTING_REQUEST, 1, attrs, SECRET.encode())


async def test_replayed_start_after_stop_same_port_after_30_seconds(live: Live) -> None:
    """Past the reply cache (30 s) the same port's copy is no retransmission any more: the replay
    filter still knows the record, and the call stays ended."""
    for ts in (True, False):
        start, stop = acct(live.clock, f"late-{ts}", 1, ts=ts), acct(live.clock, f"late-{ts}", 2, ts=ts)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            assert await live.send(start, sock=s) is not None
            assert await live.size() == 1
            live.clock.advance(5)
            assert await live.send(stop, sock=s) is not None
            assert await live.size() == 0
            live.clock.advance(CACHE_TTL + 1)
            before = live.stats()
            reply = await live.send(start, sock=s)
            assert reply is not None and reply[0] == pk.ACCOUNTING_RESPONSE
            assert await live.size() == 0
            after = live.stats()
            assert after["replays"] - before["replays"] == 1
            assert after["duplicates"] == before["duplicates"]  # not the reply cache's doing


async def test_capture_goes_stale_after_the_window(live: Live) -> None:
    start = acct(live.clock, "stale-1", 1)
    assert await live.send(start) is not None
    assert await live.send(acct(live.clock, "stale-1", 2)) is not None
    live.clock.advance(2 * WINDOW + WINDOW)  # past the replay memory too
    before = live.stats()
    assert await live.send(start) is None  # dropped: Event-Timestamp too old
    assert await live.size() == 0
    assert live.stats()["drop_reasons"]["stale_event_timestamp"] - before["drop_reasons"].get(
        "stale_event_timestamp", 0) == 1
    # just inside the window, a record is accepted (the NAS clock may be behind by up to WINDOW)
    fresh = acct(live.clock, "stale-2", 1)
    live.clock.advance(WINDOW - 1)
    assert await live.send(fresh) is not None
    assert await live.size() == 1


async def test_documented_limit_without_event_timestamp(live: Live) -> None:
    """docs/radius.md: a record without Event-Timestamp is recognised for 2 x window; a capture
    replayed later than that is applied again. This pins the documented boundary."""
    start = acct(live.clock, "nots-1", 1, ts=False)
    assert await live.send(start) is not None
    assert await live.send(acct(live.clock, "nots-1", 2, ts=False)) is not None
    live.clock.advance(2 * WINDOW - 10)
    assert await live.send(start) is not None
    assert await live.size() == 0  # still remembered
    live.clock.advance(2 * WINDOW)
    assert await live.send(start) is not None
    assert await live.size() == 1  # forgotten: applied again (send Event-Timestamp to prevent this)


async def test_duplicate_interim_not_applied_twice(live: Live) -> None:
    assert await live.send(acct(live.clock, "int-1", 1)) is not None
    live.clock.advance(10)
    interim = acct(live.clock, "int-1", 3, session_time=10)
    assert await live.send(interim) is not None
    first = await live.expires("int-1")
    assert first == live.clock.now() + 3600
    live.clock.advance(40)  # past the reply cache
    assert await live.send(interim) is not None  # answered ...
    assert await live.expires("int-1") == first  # ... not applied
    assert await live.send(acct(live.clock, "int-1", 3, session_time=50)) is not None  # a new one is
    assert await live.expires("int-1") == live.clock.now() + 3600


async def test_retransmission_with_updated_delay_is_the_same_record(live: Live) -> None:
    """RFC 2866: a NAS retrying a record updates Acct-Delay-Time (new authenticator, new packet).
    It is the same record: applied once."""
    first = acct(live.clock, "delay-1", 1, delay=0)
    retry = acct(live.clock, "delay-1", 1, delay=3)  # the same event, 3 s later
    assert first != retry
    assert await live.send(first) is not None
    live.clock.advance(3)
    before = live.stats()
    assert await live.send(retry) is not None
    after = live.stats()
    assert after["replays"] - before["replays"] == 1
    assert after["acct_start"] == before["acct_start"]
    assert await live.size() == 1


async def test_store_failure_is_not_remembered(live: Live) -> None:
    """A record the store could not take is not answered and not remembered: the NAS's
    retransmission is applied."""
    store = live.service.store
    real_end = store.end
    calls = 0

    async def failing_end(*a: Any, **kw: Any) -> Any:
        nonlocal calls
        calls += 1
        from policy.errors import StoreError

        raise StoreError("down for the test")

    live.service.notices.max_items = 0  # the notice queue refuses: the store error reaches the adapter
    assert await live.send(acct(live.clock, "sf-1", 1)) is not None
    stop = acct(live.clock, "sf-1", 2)
    store.end = failing_end  # type: ignore[method-assign]
    try:
        assert await live.send(stop) is None
    finally:
        store.end = real_end  # type: ignore[method-assign]
    assert calls == 1 and await live.size() == 1
    assert await live.send(stop) is not None
    assert await live.size() == 0


@needs_radclient
@pytest.mark.radius
async def test_radclient_start_replayed_after_30_seconds(live: Live, tmp_path: Any) -> None:
    (tmp_path / "dictionary").write_text(RADCLIENT_DICT)
    assert RADCLIENT is not None

    async def radclient(attrs: str) -> str:
        proc = await asyncio.create_subprocess_exec(
            RADCLIENT, "-d", str(tmp_path), "-x", "-r", "1", "-t", "1", f"127.0.0.1:{live.acct}", "acct", SECRET,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        out, _ = await proc.communicate(attrs.encode())
        return out.decode(errors="replace")

    base = 'User-Name = "acme", Acct-Session-Id = "rc-late"'
    assert "Accounting-Response" in await radclient(base + ", Acct-Status-Type = Start")
    assert await live.size() == 1
    assert "Accounting-Response" in await radclient(base + ", Acct-Status-Type = Stop")
    assert await live.size() == 0
    live.clock.advance(31)
    before = live.stats()
    assert "Accounting-Response" in await radclient(base + ", Acct-Status-Type = Start")
    assert await live.size() == 0
    assert live.stats()["replays"] - before["replays"] == 1


async def test_new_admission_after_failed_is_answered_by_its_start(live: Live) -> None:
    """The INVITE resent after a 407 keeps its Call-ID and From-tag: check, Failed, check again,
    Start. The second admission becomes active (the Start answers it) - not ignored, not doubled."""
    def check() -> bytes:
        return pk.request(pk.ACCESS_REQUEST, 3, [(1, b"acme"), (44, b"auth-407"), (105, b"ft")], SECRET.encode(),
                          message_authenticator=True)

    reply = await live.send(check(), live.auth)
    assert reply is not None and reply[0] == pk.ACCESS_ACCEPT
    failed = [(40, struct.pack("!I", 15)), (1, b"acme"), (44, b"auth-407"), (105, b"ft"),
              (102, struct.pack("!I", 407)), (55, struct.pack("!I", int(live.clock.now())))]
    assert await live.send(pk.request(pk.ACCOUNTING_REQUEST, 4, failed, SECRET.encode())) is not None
    assert await live.size() == 0
    live.clock.advance(1)
    reply = await live.send(check(), live.auth)
    assert reply is not None and reply[0] == pk.ACCESS_ACCEPT
    start = [(40, struct.pack("!I", 1)), (1, b"acme"), (44, b"auth-407"), (105, b"ft"),
             (55, struct.pack("!I", int(live.clock.now())))]
    before = live.stats()
    assert await live.send(pk.request(pk.ACCOUNTING_REQUEST, 5, start, SECRET.encode())) is not None
    rec = await live.service.store.get_call("auth-407 ft", live.clock.now())
    assert rec is not None and rec.state == "active" and rec.node == "radius:lo"
    assert await live.size() == 1
    assert live.stats()["acct_start_after_end"] - before.get("acct_start_after_end", 0) == 1


def test_drop_warnings_are_rate_limited() -> None:
    class Capture:
        def __init__(self) -> None:
            self.lines: list[str] = []

        def info(self, event: str, **kw: Any) -> None:
            self.lines.append(event)

        def warning(self, event: str, **kw: Any) -> None:
            self.lines.append(event)

    now = [100.0]
    target = Capture()
    limited = RateLimited(target, burst=20, clock=lambda: now[0])
    for _ in range(50):
        limited.warning("radius_dropped")
    assert len(target.lines) == 20
    limited.info("radius_nas_accounting_on")  # infos always pass
    now[0] += 1
    limited.warning("radius_dropped")
    assert len(target.lines) == 22


# -- the bounded memory, pure ------------------------------------------------------------------------


def test_seen_set_expires_by_bucket_and_stays_bounded() -> None:
    s = SeenSet(ttl=100, capacity=1000, buckets=4)
    s.add(1, 0)
    assert s.seen(1, 99) and s.seen(1, 120)  # kept at least ttl, at most ttl + one bucket (25)
    assert not s.seen(1, 125)
    for i in range(5000):
        s.add(i, 200 + i * 0.01)
    assert s.size <= 1000 and s.evicted >= 4000
    assert s.seen(4999, 250)
    s.discard(4999)
    assert not s.seen(4999, 250)
