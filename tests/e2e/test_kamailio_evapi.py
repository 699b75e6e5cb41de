"""The evapi connector against a small asyncio evapi server (no Kamailio needed): netstrings,
tindex/tlabel echo, which messages get replies, socket options, reconnect and close."""

from __future__ import annotations

import asyncio
import socket
from types import SimpleNamespace
from typing import Any

import orjson

from policy import protocol as P
from policy.transports.evapi import needs_reply, start_evapi
from policy.wire import Framing, Message, StreamDecoder, encode


class FakeService:
    """Answers like PolicyService.handle: echoes id/tindex/tlabel; records what it saw."""

    def __init__(self) -> None:
        self.info_providers: dict[str, Any] = {}
        self.seen: list[dict[str, Any]] = []

    async def handle(self, req: P.Request, peer: Any) -> dict[str, Any]:
        msg = {k: v for k, v in orjson.loads(P.msgspec.json.encode(req)).items() if v not in (None, "", False)}
        self.seen.append(msg)
        reply = {k: msg[k] for k in ("id", "tindex", "tlabel") if k in msg}
        reply["ok"] = True
        if msg.get("op") == "check":
            await asyncio.sleep(0.01 if msg.get("call_id", "").startswith("slow") else 0)
            reply["decision"] = "allow"
        return reply


class FakeEvapi:
    """Plays Kamailio's evapi module: the TCP server; records connections and frames."""

    def __init__(self) -> None:
        self.conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self.connected = asyncio.Event()
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self, port: int = 0) -> FakeEvapi:
        self.server = await asyncio.start_server(self._on_conn, "127.0.0.1", port)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _on_conn(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        self.conns.append((r, w))
        self.connected.set()

    async def wait_conn(self, n: int, timeout: float = 5.0) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        async def waiter() -> None:
            while len(self.conns) < n:
                await asyncio.sleep(0.01)

        await asyncio.wait_for(waiter(), timeout)
        return self.conns[n - 1]

    async def close(self) -> None:
        for _r, w in self.conns:
            w.close()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


async def read_frames(r: asyncio.StreamReader, n: int, timeout: float = 2.0) -> list[dict[str, Any]]:
    dec = StreamDecoder()
    out: list[dict[str, Any]] = []
    while len(out) < n:
        data = await asyncio.wait_for(r.read(65536), timeout)
        assert data, "connection closed"
        for ev in dec.feed(data):
            assert isinstance(ev, Message) and ev.framing is Framing.NETSTRING
            out.append(orjson.loads(ev.payload))
    return out


def settings(*ports: int, reconnect_max: float = 0.2) -> SimpleNamespace:
    return SimpleNamespace(evapi_nodes=[f"127.0.0.1:{p}" for p in ports], evapi_reconnect_max=reconnect_max,
                           max_message=65536)


def ns(msg: dict[str, Any]) -> bytes:
    return encode(msg, Framing.NETSTRING)


def test_which_messages_get_replies() -> None:
    assert needs_reply(P.from_dict({"op": "check", "call_id": "a", "tindex": 1, "tlabel": 2}))
    assert needs_reply(P.from_dict({"op": "ping"}))
    assert not needs_reply(P.from_dict({"op": "answer", "call_id": "a"}))
    assert not needs_reply(P.from_dict({"op": "end", "call_id": "a"}))
    assert not needs_reply(P.from_dict({"op": "refresh", "call_id": "a"}))
    assert needs_reply(P.from_dict({"op": "end", "call_id": "a", "id": 7}))


async def test_check_answered_with_tindex_tlabel_notices_silent() -> None:
    svc = FakeService()
    kam = await FakeEvapi().start()
    close = await start_evapi(svc, settings(kam.port))
    try:
        r, w = await kam.wait_conn(1)
        # a slow check first: replies are written when ready, each naming its transaction
        w.write(ns({"op": "check", "call_id": "slow-c1", "tindex": 11, "tlabel": 1})
                + b"\n" + ns({"op": "end", "call_id": "c0"})
                + ns({"op": "check", "call_id": "c2", "tindex": 12, "tlabel": 2}))
        # a frame split over two writes, then a notice that asks for a reply
        frame = ns({"op": "answer", "call_id": "c2", "id": "a1"})
        w.write(frame[:5])
        await w.drain()
        await asyncio.sleep(0.02)
        w.write(frame[5:])
        replies = await read_frames(r, 3)
        by_call = {(x.get("tindex"), x.get("tlabel"), x.get("id")) for x in replies}
        assert by_call == {(11, 1, None), (12, 2, None), (None, None, "a1")}
        assert all(x["ok"] for x in replies)
        assert [m["op"] for m in svc.seen] == ["check", "end", "check", "answer"]
        info = svc.info_providers["evapi"]()
        node = info["nodes"][f"127.0.0.1:{kam.port}"]
        assert info["connected"] == 1 and node["received"] == 4 and node["replied"] == 3
    finally:
        await close()
        await kam.close()
    assert "evapi" not in svc.info_providers


async def test_nodelay_and_quickack_set() -> None:
    svc = FakeService()
    kam = await FakeEvapi().start()
    close = await start_evapi(svc, settings(kam.port))
    try:
        r, w = await kam.wait_conn(1)
        w.write(ns({"op": "ping", "id": 1}))
        await read_frames(r, 1)
        from policy.transports import evapi

        await asyncio.sleep(0)
        # the connector's own socket (the client side)
        sock = next(iter(_protocols(close)))
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
        assert evapi._QUICKACK is not None  # Linux: set after every read
    finally:
        await close()
        await kam.close()


def _protocols(close: Any) -> list[Any]:
    """Find the connector's client sockets through the closer's closure (test-only peek)."""
    nodes = next(c.cell_contents for c in close.__closure__ if isinstance(c.cell_contents, list))
    return [n.protocol.sock for n in nodes if n.protocol is not None]


async def test_bad_json_is_dropped_and_bad_framing_reconnects() -> None:
    svc = FakeService()
    kam = await FakeEvapi().start()
    close = await start_evapi(svc, settings(kam.port))
    try:
        r, w = await kam.wait_conn(1)
        w.write(b"5:nope!," + ns({"op": "ping", "id": 2}))
        assert (await read_frames(r, 1))[0]["id"] == 2
        w.write(b"12x:garbage")
        r2, w2 = await kam.wait_conn(2)  # the connector gave up on that stream and came back
        w2.write(ns({"op": "ping", "id": 3}))
        assert (await read_frames(r2, 1))[0]["id"] == 3
        node = svc.info_providers["evapi"]()["nodes"][f"127.0.0.1:{kam.port}"]
        assert node["bad_messages"] == 1 and node["protocol_errors"] == 1 and node["connects"] == 2
    finally:
        await close()
        await kam.close()


async def test_reconnects_when_kamailio_restarts_and_close_stops_it() -> None:
    svc = FakeService()
    kam = await FakeEvapi().start()
    port = kam.port
    close = await start_evapi(svc, settings(port, reconnect_max=0.2))
    try:
        await kam.wait_conn(1)
        await kam.close()  # Kamailio goes away
        await asyncio.sleep(0.3)
        assert svc.info_providers["evapi"]()["connected"] == 0
        kam = await FakeEvapi().start(port)  # and comes back on the same port
        r, w = await kam.wait_conn(1, timeout=3)
        w.write(ns({"op": "check", "call_id": "x", "tindex": 1, "tlabel": 9}))
        assert (await read_frames(r, 1))[0]["tlabel"] == 9
        node = svc.info_providers["evapi"]()["nodes"][f"127.0.0.1:{port}"]
        assert node["connects"] == 2 and node["connected"]
    finally:
        await close()
    # closed: no more reconnects
    n = len(kam.conns)
    await asyncio.sleep(0.5)
    assert len(kam.conns) == n
    await kam.close()


async def test_unreachable_node_does_not_block_the_others() -> None:
    svc = FakeService()
    kam = await FakeEvapi().start()
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    dead_port = dead.getsockname()[1]
    dead.close()
    close = await start_evapi(svc, settings(dead_port, kam.port))
    try:
        r, w = await kam.wait_conn(1)
        w.write(ns({"op": "ping", "id": "p"}))
        assert (await read_frames(r, 1))[0]["id"] == "p"
        info = svc.info_providers["evapi"]()
        assert info["connected"] == 1
        assert info["nodes"][f"127.0.0.1:{dead_port}"]["last_error"]
    finally:
        await close()
        await kam.close()
    assert orjson.dumps(info)  # stats can serialise it
