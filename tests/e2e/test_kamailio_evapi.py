"""The evapi connector against a small asyncio evapi server (no Kamailio needed): the
challenge-response handshake, netstrings, tindex/tlabel echo, which messages get replies, socket
options, reconnect and close, JSON-RPC requests (dialog lists) and Kamailio's RPC shapes."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import orjson
import pytest

from policy import protocol as P
from policy.reconcile import DialogSourceError
from policy.settings import Settings
from policy.transports.evapi import needs_reply, parse_briefing, parse_dialog, proof, start_evapi
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


SECRET = "connector-test-secret"


class FakeEvapi:
    """Plays Kamailio's evapi module and the shipped config's handshake: the TCP server sends
    `callpolicy.challenge`, checks the proof, answers with its own (`mode` "ok"), a wrong one
    ("bad_proof"), a refusal ("reject"), or sends no challenge at all ("silent").
    `wait_conn(n)` returns the n-th connection once its handshake is over."""

    def __init__(self, mode: str = "ok", secret: str = SECRET) -> None:
        self.mode = mode
        self.secret = secret
        self.conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self.handshakes: list[dict[str, Any]] = []
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self, port: int = 0) -> FakeEvapi:
        self.server = await asyncio.start_server(self._on_conn, "127.0.0.1", port)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _on_conn(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        if self.mode != "silent":
            nonce = f"nonce-{len(self.conns)}-{id(w)}"
            w.write(ns({"jsonrpc": "2.0", "method": "callpolicy.challenge", "params": {"nonce": nonce}}))
            auth = (await read_frames(r, 1))[0]
            self.handshakes.append(auth)
            ok = auth["params"]["proof"] == proof(nonce, self.secret)
            if self.mode == "reject" or not ok:
                w.write(ns({"jsonrpc": "2.0", "id": auth["id"],
                            "error": {"code": 401, "message": "authentication failed"}}))
            else:
                mine = proof(auth["params"]["nonce"], self.secret, "kamailio")
                if self.mode == "bad_proof":
                    mine = proof(auth["params"]["nonce"], "not-the-secret", "kamailio")
                w.write(ns({"jsonrpc": "2.0", "id": auth["id"], "result": {"proof": mine}}))
        self.conns.append((r, w))

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


def settings(*ports: int, reconnect_max: float = 0.2, secret: str = SECRET) -> Settings:
    return Settings(evapi_nodes=[f"127.0.0.1:{p}" for p in ports], evapi_reconnect_max=reconnect_max,
                    max_message=65536, evapi_token=secret)


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


# -- authentication -------------------------------------------------------------------------


def _node(close: Any) -> Any:
    """The connector's node objects, through the closer's closure (test-only peek)."""
    return next(c.cell_contents for c in close.__closure__ if isinstance(c.cell_contents, list))[0]


async def test_handshake_proves_the_secret_without_sending_it() -> None:
    svc = FakeService()
    kam = await FakeEvapi().start()
    close = await start_evapi(svc, settings(kam.port))
    try:
        r, w = await kam.wait_conn(1)
        auth = kam.handshakes[0]
        assert auth["method"] == "callpolicy.auth"
        assert SECRET not in orjson.dumps(auth).decode()
        assert len(auth["params"]["nonce"]) >= 16
        w.write(ns({"op": "ping", "id": "p"}))
        assert (await read_frames(r, 1))[0]["id"] == "p"
        node = svc.info_providers["evapi"]()["nodes"][f"127.0.0.1:{kam.port}"]
        assert node["connected"] and node["auth_failures"] == 0
    finally:
        await close()
        await kam.close()


async def test_a_node_that_refuses_our_proof_is_retried_and_never_trusted() -> None:
    svc = FakeService()
    kam = await FakeEvapi(secret="the-node-has-another-secret").start()
    close = await start_evapi(svc, settings(kam.port, reconnect_max=0.1))
    try:
        await kam.wait_conn(2, timeout=5)  # refused, then tried again
        node = svc.info_providers["evapi"]()["nodes"][f"127.0.0.1:{kam.port}"]
        assert not node["connected"] and node["auth_failures"] >= 1
        assert "authentication failed" in node["last_error"]
    finally:
        await close()
        await kam.close()


async def test_a_server_that_cannot_prove_the_secret_gets_nothing_handled() -> None:
    """A process squatting the evapi port answers the handshake without the secret: what it
    sends next (a check that would reserve a slot) is never handled."""
    svc = FakeService()
    kam = await FakeEvapi(mode="bad_proof").start()
    close = await start_evapi(svc, settings(kam.port, reconnect_max=5.0))
    try:
        _r, w = await kam.wait_conn(1)
        w.write(ns({"op": "check", "call_id": "squat", "tindex": 1, "tlabel": 1}))
        await asyncio.sleep(0.3)
        assert svc.seen == []
        node = svc.info_providers["evapi"]()["nodes"][f"127.0.0.1:{kam.port}"]
        assert not node["connected"] and node["auth_failures"] >= 1
    finally:
        await close()
        await kam.close()


async def test_nothing_before_the_handshake_is_handled_and_size_is_bounded() -> None:
    svc = FakeService()
    kam = await FakeEvapi(mode="silent").start()
    close = await start_evapi(svc, settings(kam.port, reconnect_max=5.0))
    try:
        _r, w = await kam.wait_conn(1)
        w.write(ns({"op": "check", "call_id": "early", "tindex": 1, "tlabel": 1}))
        await asyncio.sleep(0.2)
        assert svc.seen == []
        node = svc.info_providers["evapi"]()["nodes"][f"127.0.0.1:{kam.port}"]
        assert node["bad_messages"] == 1 and not node["connected"]
        # more than protocol.max_message before authentication: the connection is dropped
        w.write(b"%d:" % (200_000) + b"x" * 70_000)
        await kam.wait_conn(2, timeout=3)
        node = svc.info_providers["evapi"]()["nodes"][f"127.0.0.1:{kam.port}"]
        assert node["protocol_errors"] == 1
    finally:
        await close()
        await kam.close()


# -- JSON-RPC: the node's dialog list ----------------------------------------------------------

# Shapes as Kamailio 5.6.3 sends them through jsonrpc_exec (captured from the shipped config).
BRIEFING_ROW = {"h_entry": 2675, "h_id": 8284, "call-id": "1-17391@127.0.0.1", "from_tag": "17391-1",
                "init_ts": 1795961586, "state": 4}
DLG_LIST = {
    "h_entry": 2675, "h_id": 8284, "ref": 2, "call-id": "1-17391@127.0.0.1", "from_uri": "sip:acme@127.0.0.1",
    "to_uri": "sip:200@127.0.0.1:47335", "state": 4, "start_ts": 1795961586, "init_ts": 1795961586, "end_ts": 0,
    "duration": 1, "timeout": 1796004786, "lifetime": 43200, "dflags": 643, "sflags": 0, "iflags": 0,
    "caller": {"tag": "17391-1", "contact": "sip:acme@127.0.0.1:59589", "cseq": "2", "route_set": "",
               "socket": "udp:127.0.0.1:47335"},
    "callee": {"tag": "17372-1", "contact": "sip:127.0.0.1:56249;transport=UDP", "cseq": "0", "route_set": "",
               "socket": "udp:127.0.0.1:47335"},
    "profiles": [],
    "variables": [{"cp_token": "T2"}, {"cp_req": "{\"op\":\"check\",\"call_id\":\"1-17391@127.0.0.1\",\"from_tag\":"
                                                 "\"17391-1\",\"from\":\"sip:acme@127.0.0.1\",\"to\":\"sip:200@127.0.0.1"
                                                 ":47335\",\"ruri\":\"sip:200@127.0.0.1:47335\",\"src_ip\":\"127.0.0.1\","
                                                 "\"account\":\"acme\"}"}],
}


def test_kamailio_shapes_parse() -> None:
    rows = parse_briefing([BRIEFING_ROW, {**BRIEFING_ROW, "h_id": 8283, "state": 5},
                           {**BRIEFING_ROW, "call-id": "x", "state": 1}])
    assert [(d.call_id, d.from_tag, d.state, d.init_ts) for d in rows] == [
        ("1-17391@127.0.0.1", "17391-1", "active", 1795961586.0), ("1-17391@127.0.0.1", "17391-1", "ended",
                                                                   1795961586.0),
        ("x", "17391-1", "early", 1795961586.0)]
    assert rows[0].uid == "1-17391@127.0.0.1 17391-1"
    d = parse_dialog(DLG_LIST)
    assert d is not None
    assert (d.call_id, d.from_tag, d.state, d.token) == ("1-17391@127.0.0.1", "17391-1", "active", "T2")
    assert d.request["account"] == "acme" and d.request["src_ip"] == "127.0.0.1"
    assert parse_dialog({}) is None  # dlg.dlg_list of a dialog the node no longer has
    bare = parse_dialog({**DLG_LIST, "variables": []})
    assert bare is not None and bare.request == {"from": "sip:acme@127.0.0.1", "to": "sip:200@127.0.0.1:47335"}
    assert bare.token == ""
    with pytest.raises(DialogSourceError):
        parse_briefing({"not": "a list"})


async def test_dialog_list_over_the_connection_large_and_interleaved() -> None:
    """dlg.briefing with 20,000 dialogs (~2 MB, over the 64 KiB pre-auth limit) comes back
    whole while checks keep flowing; a JSON-RPC error becomes DialogSourceError."""
    svc = FakeService()
    kam = await FakeEvapi().start()
    close = await start_evapi(svc, settings(kam.port))
    try:
        r, w = await kam.wait_conn(1)
        node = _node(close)
        task = asyncio.ensure_future(node.dialogs())
        req = (await read_frames(r, 1))[0]
        assert req["method"] == "dlg.briefing" and req["params"] == ["cFIs"]
        rows = [{**BRIEFING_ROW, "call-id": f"c{i}", "h_id": i} for i in range(20_000)]
        body = ns({"jsonrpc": "2.0", "result": rows, "id": req["id"]})
        assert len(body) > 1_900_000
        w.write(ns({"op": "check", "call_id": "during", "tindex": 5, "tlabel": 6}) + body)
        got = await asyncio.wait_for(task, 5)
        assert len(got) == 20_000 and got[-1].call_id == "c19999"
        assert (await read_frames(r, 1))[0]["tlabel"] == 6
        task2 = asyncio.ensure_future(node.dialog("c1", "17391-1"))
        req = (await read_frames(r, 1))[0]
        assert req["method"] == "dlg.dlg_list" and req["params"] == ["c1", "17391-1"]
        w.write(ns({"jsonrpc": "2.0", "id": req["id"], "error": {"code": 403, "message": "method not allowed"}}))
        with pytest.raises(DialogSourceError, match="not allowed"):
            await asyncio.wait_for(task2, 5)
        # a request in flight when the connection drops fails at once
        task3 = asyncio.ensure_future(node.dialogs())
        await read_frames(r, 1)
        w.close()
        with pytest.raises(DialogSourceError):
            await asyncio.wait_for(task3, 5)
    finally:
        await close()
        await kam.close()


async def test_late_end_of_an_earlier_attempt_never_releases_the_later_one() -> None:
    """The real service behind the connector: the 407-challenged attempt's `end` arrives after
    the re-sent INVITE's check (same Call-ID and From-tag). It carries the first admission's
    token, so it is ignored; the answered call is released by its own `end` only."""
    from pathlib import Path

    from policy.service import PolicyService
    from policy.store.embedded import EmbeddedStore

    service = PolicyService(Path(__file__).resolve().parents[2] / "rules", EmbeddedStore())
    kam = await FakeEvapi().start()
    close = await start_evapi(service, settings(kam.port))
    call = {"call_id": "c407", "from_tag": "ft1", "from": "sip:acme@example.com", "to": "sip:200@example.com",
            "account": "acme"}
    try:
        r, w = await kam.wait_conn(1)
        w.write(ns({"op": "check", "tindex": 1, "tlabel": 1, **call}))
        first = (await read_frames(r, 1))[0]
        w.write(ns({"op": "check", "tindex": 2, "tlabel": 2, **call}))  # the re-sent INVITE
        second = (await read_frames(r, 1))[0]
        assert first["decision"] == second["decision"] == "allow" and first["token"] != second["token"]
        w.write(ns({"op": "answer", "call_id": "c407", "from_tag": "ft1", "token": second["token"]})
                + ns({"op": "end", "call_id": "c407", "from_tag": "ft1", "token": first["token"], "reason": "failed",
                      "id": "late"}))
        late = (await read_frames(r, 1))[0]
        assert late["id"] == "late" and late["released"] is False and late["stale"] is True
        assert await service.store.profile_size("account", "acme", service.clock.now()) == 1
        w.write(ns({"op": "end", "call_id": "c407", "from_tag": "ft1", "token": second["token"], "reason": "bye",
                    "id": "bye"}))
        assert (await read_frames(r, 1))[0]["released"] is True
        assert await service.store.profile_size("account", "acme", service.clock.now()) == 0
    finally:
        await close()
        await kam.close()


# -- settings and the command line ----------------------------------------------------------


def test_evapi_command_line_adds_nodes_and_the_secret_is_required(tmp_path: Any) -> None:
    from policy.cli import _settings, build_parser
    from policy.errors import SettingsError

    (tmp_path / "evapi.token").write_text("s3cret\n")
    cfg = tmp_path / "service.toml"
    cfg.write_text('[evapi]\nnodes = ["10.0.0.1:8448"]\ntoken_file = "evapi.token"\nreconcile_interval = 5\n')
    p = build_parser()
    s = _settings(p.parse_args(["--config", str(cfg), "serve", "--evapi", "10.0.0.2:8448", "--evapi", "10.0.0.2:8448"]))
    assert s.evapi_nodes == ["10.0.0.1:8448", "10.0.0.2:8448"]  # added, not replaced; no duplicates
    assert s.evapi_secret() == "s3cret" and s.evapi_reconcile_interval == 5
    s = _settings(p.parse_args(["--config", str(cfg), "serve", "--evapi", "none", "--evapi", "10.0.0.3:8448"]))
    assert s.evapi_nodes == ["10.0.0.3:8448"]  # "none" drops the configured ones first
    cfg.write_text('[evapi]\nnodes = ["10.0.0.1:8448"]\n')
    with pytest.raises(SettingsError, match=r"evapi\.token"):
        _settings(p.parse_args(["--config", str(cfg), "serve"]))
    s = _settings(p.parse_args(["--config", str(cfg), "serve", "--evapi-token-file", str(tmp_path / "evapi.token")]))
    assert s.evapi_secret() == "s3cret"
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(SettingsError, match="empty"):
        _settings(p.parse_args(["--config", str(cfg), "serve", "--evapi-token-file", str(tmp_path / "empty")]))
    cfg.write_text("[evapi]\nreconcile_grace = 0\n")
    with pytest.raises(SettingsError, match="reconcile_grace"):
        _settings(p.parse_args(["--config", str(cfg), "serve"]))


async def test_notices_in_flight_survive_a_dropped_connection() -> None:
    """An `end` still being handled (a slow store) when Kamailio's connection drops is applied
    all the same: the connection's loss cancels nothing."""

    class SlowNotices(FakeService):
        def __init__(self) -> None:
            super().__init__()
            self.applied: list[str] = []

        async def handle(self, req: P.Request, peer: Any) -> dict[str, Any]:
            reply = await super().handle(req, peer)
            if req.op == "end":
                await asyncio.sleep(0.2)
                self.applied.append(req.call_id)  # type: ignore[attr-defined]
            return reply

    svc = SlowNotices()
    kam = await FakeEvapi().start()
    close = await start_evapi(svc, settings(kam.port, reconnect_max=5.0))
    try:
        _r, w = await kam.wait_conn(1)
        w.write(ns({"op": "end", "call_id": "c1", "from_tag": "f", "token": "t", "reason": "bye"}))
        await w.drain()
        for _ in range(100):
            if svc.seen:
                break
            await asyncio.sleep(0.01)
        w.close()  # Kamailio goes away while the end is being applied
        await asyncio.sleep(0.4)
        assert svc.applied == ["c1"]
    finally:
        await close()
        await kam.close()
