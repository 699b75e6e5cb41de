"""Connection-level policy over real sockets (issues 9 and 10): UDP allowlist and amplification bound,
capped timeouts and fields, per-peer caps and the Unix reserve, slowloris, idle timeout, back-pressure,
supervised background tasks, rate-limited warnings, the Unix socket's mode."""

from __future__ import annotations

import asyncio
import grp
import os
import socket
import stat
import time
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest
from structlog.testing import capture_logs

from policy.client import Client
from policy.errors import SettingsError
from policy.ratelimit_log import RateLimitedLog
from policy.settings import load_settings
from policy.supervise import supervise
from policy.transports.flow import HIGH_WATER
from policy.transports.stream import StreamProtocol
from policy.transports.udp import bounded_reply
from policy.wire import Framing
from tests.inproc import Served, jline, serving
from tests.test_service import AClient, chk

# -- UDP -------------------------------------------------------------------------------------


async def test_udp_outside_the_allowlist_is_dropped(tmp_path: Path) -> None:
    """Only sources in udp_allow are read: here 127.0.0.2 is, 127.0.0.1 is not (no answer, no count)."""
    async with serving(tmp_path, udp_allow=["127.0.0.2/32"]) as srv:
        check = orjson.dumps({"op": "check", "id": 1, **chk("spoof"), "pad": "x" * 300})
        assert await srv.udp(check, source="127.0.0.1", wait=0.5) is None
        assert await srv.service.store.profile_size("total", None, srv.clock.now()) == 0
        reply = await srv.udp(check, source="127.0.0.2")
        assert reply is not None and orjson.loads(reply)["decision"] == "allow"
        c = await srv.tcp()
        udp = (await c.call("stats"))["udp"]
        assert udp["dropped"] == 1 and udp["received"] == 1
        await c.close()


async def test_udp_holds_the_proxy_role_only(tmp_path: Path) -> None:
    """Admin ops over UDP are refused (UDP cannot authenticate a source)."""
    async with serving(tmp_path) as srv:
        for op in ("stats", "reload", "profile_list", "release"):
            reply = await srv.udp(orjson.dumps({"op": op, "profile": "total", "call_id": "a", "pad": "x" * 200}))
            assert reply is not None
            error = orjson.loads(reply)["error"]
            assert error["code"] == "forbidden", op
            assert "TCP or the Unix socket" in error["message"], error  # where to ask instead
        assert srv.service.reloads == 0


async def test_udp_answer_is_never_larger_than_its_request(tmp_path: Path) -> None:
    """No amplification: with 50 calls held, every answer fits in its request's size (the issue's
    39-byte profile_list got 16.7 KB); an answer that does not fit is shrunk, then a bare
    too_big, then nothing; a padded request gets the whole answer."""
    async with serving(tmp_path) as srv:
        c = await srv.tcp()
        for i in range(50):
            assert (await c.call("check", **chk(f"h{i}", user=f"u{i}", account=f"a{i}")))["decision"] == "allow"
        await c.close()
        requests = [
            b'{"op":"profile_list","profile":"total"}',  # the 39 bytes
            b'{"op":"ping"}',
            b'{"op":"check","call_id":"z"}',
            b"garbage",
            b'{"op":"end","call_id":"h1"}',
            orjson.dumps({"op": "check", **chk("c1", user="c1", account="c1")}),
            orjson.dumps({"op": "check", "call_id": "c2", "from": "sip:c2@example.com", "to": "sip:1@example.com",
                          "account": "acme", "pad": "x" * 400}),
        ]
        replies = [await srv.udp(r, wait=0.5) for r in requests]
        sent = received = 0
        for req, rep in zip(requests, replies, strict=True):
            sent += len(req)
            if rep is not None:
                assert len(rep) <= len(req), (req, rep)
                received += len(rep)
        assert received <= sent
        listed = orjson.loads(replies[0])  # type: ignore[arg-type]
        assert listed == {"ok": False, "error": {"code": "too_big"}}
        assert replies[1] is None  # 13 bytes cannot carry any answer
        small = orjson.loads(replies[5])  # type: ignore[arg-type]
        assert small["decision"] == "allow" and "profiles" not in small  # shrunk: scalars only
        full = orjson.loads(replies[6])  # type: ignore[arg-type]
        assert full["decision"] == "allow" and len(full["profiles"]) == 5  # padded: the whole answer
        # z, c1 and c2 were admitted and h1 ended, though their answers were cut or withheld
        assert await srv.service.store.profile_size("total", None, srv.clock.now()) == 52


def test_bounded_reply_steps() -> None:
    """Whole, else scalars only (an error keeps its code), else a bare too_big with the echo, else None."""
    reply = {"id": 7, "ok": False, "error": {"code": "forbidden", "message": "m" * 100}, "x": [1, 2]}
    assert bounded_reply(reply, Framing.DATAGRAM, 1000) == orjson.dumps(reply)
    assert orjson.loads(bounded_reply(reply, Framing.DATAGRAM, 60) or b"") == {
        "id": 7, "ok": False, "error": {"code": "forbidden"}}
    assert orjson.loads(bounded_reply(reply, Framing.DATAGRAM, 46) or b"") == {
        "id": 7, "ok": False, "error": {"code": "too_big"}}
    assert bounded_reply(reply, Framing.DATAGRAM, 20) is None


# -- client-supplied values ------------------------------------------------------------------


async def test_huge_timeout_is_capped(tmp_path: Path) -> None:
    """The issue's spoofing: check + answer with timeout 99999999 filled acme with 1,157-day leases.
    The lease is capped at max_timeout (default: default_timeout), over UDP and TCP alike."""
    async with serving(tmp_path) as srv:
        now = srv.clock.now()
        pad = "x" * 200
        for i in range(3):
            await srv.udp(orjson.dumps({"op": "check", **chk(f"s{i}", user=f"u{i}"), "pad": pad}))
            reply = await srv.udp(orjson.dumps({"op": "answer", "call_id": f"s{i}", "timeout": 99999999, "pad": pad}))
            assert reply is not None and orjson.loads(reply)["expires"] == now + 43200
        c = await srv.tcp()
        assert (await c.call("refresh", call_id="s0", timeout=1e12))["expires"] == now + 43200
        await c.close()
    async with serving(tmp_path, max_timeout=3600.0) as srv:
        c = await srv.tcp()
        for i in range(3):
            await c.call("check", **chk(f"s{i}", user=f"u{i}"))
            r = await c.call("answer", call_id=f"s{i}", timeout=99999999)
            assert r["expires"] == srv.clock.now() + 3600
        assert (await c.call("check", **chk("real", user="r")))["decision"] == "deny"
        srv.clock.advance(3600)  # the squatters' leases end at the cap: the real call gets in
        assert (await c.call("check", **chk("real", user="r")))["decision"] == "allow"
        await c.close()


async def test_oversized_fields_refused_with_bad_field(tmp_path: Path) -> None:
    """30 KB call-id/from/account/vars are refused with bad_field, nothing held; max_field is configurable."""
    big = "x" * 30000
    async with serving(tmp_path) as srv:
        c = await srv.tcp()
        for fields in ({"call_id": big}, {"from": f"sip:{big}@example.com"}, {"account": big},
                       {"vars": {"v": big}}, {"from_tag": big}, {"attrs": {"a": big}}):
            msg = {**chk("big"), **fields}
            r = await c.call("check", **msg)
            assert r["ok"] is False and r["error"]["code"] == "bad_field", fields
            assert "is longer than 1024 characters" in r["error"]["message"]
        assert await srv.service.store.profile_size("total", None, srv.clock.now()) == 0
        assert (await c.call("check", **chk("after")))["decision"] == "allow"
        await c.close()
    async with serving(tmp_path, max_field=100) as srv:
        c = await srv.tcp()
        assert (await c.call("check", **chk("a" * 100)))["decision"] == "allow"
        r = await c.call("check", **chk("a" * 101))
        assert r["error"] == {"code": "bad_field", "message": "'call_id' is longer than 100 characters"}
        await c.close()



async def test_max_vars_refused_with_bad_field(tmp_path: Path) -> None:
    """[protocol] max_vars bounds a call's variables: a check carrying more is refused with
    bad_field (nothing held, only bad_requests counted, the connection still answers); set_var adding
    one past the bound is refused, overwriting or deleting an existing one still works."""
    async with serving(tmp_path, max_vars=2) as srv:
        c = await srv.tcp()
        before = await c.call("stats")
        r = await c.call("check", **chk("v3", vars={"a": "1", "b": "2", "c": "3"}))
        assert r["ok"] is False and r["error"] == {"code": "bad_field",
                                                   "message": "'vars' holds more than 2 variables"}
        assert (await c.call("ping"))["ok"] is True  # the connection stays usable
        after = await c.call("stats")
        bad = before["decisions"].get("bad_requests", 0) + 1  # counted as a bad request, nothing else
        assert after["decisions"] == {**before["decisions"], "bad_requests": bad}
        assert after["rules"] == before["rules"]
        assert after["dialogs"] == before["dialogs"]
        assert await srv.service.store.profile_size("total", None, srv.clock.now()) == 0
        assert await srv.service.store.get_call("v3", srv.clock.now()) is None

        r = await c.call("check", **chk("v2", vars={"a": "1", "b": "2"}))
        assert r["decision"] == "allow", r
        r = await c.call("set_var", call_id="v2", name="c", value="3")
        assert r["ok"] is False and r["error"] == {"code": "bad_field",
                                                   "message": "the call already holds 2 variables"}
        r = await c.call("set_var", call_id="v2", name="a", value="changed")
        assert r["found"] is True and r["vars"] == {"a": "changed", "b": "2"}
        r = await c.call("set_var", call_id="v2", name="b", value=None)
        assert r["found"] is True and r["vars"] == {"a": "changed"}
        r = await c.call("set_var", call_id="v2", name="c", value="3")  # room again after the delete
        assert r["found"] is True and r["vars"] == {"a": "changed", "c": "3"}
        assert await srv.service.store.profile_size("total", None, srv.clock.now()) == 1
        await c.close()

# -- connection bounds -------------------------------------------------------------------------


async def _settle(srv: Served, total: int) -> None:
    st = srv.server.conn_stats
    deadline = time.monotonic() + 10
    while st.accepted + st.refused < total and time.monotonic() < deadline:
        await asyncio.sleep(0.01)


def _stats_over_unix(path: str) -> dict[str, Any]:
    with Client(unix=path, timeout=5) as c:
        return c.request("stats")


async def test_idle_flood_does_not_lock_others_out(tmp_path: Path) -> None:
    """One address opening 200 idle connections holds max_per_peer (20) of them; another address
    still gets in; when TCP is full the Unix socket's reserve still lets the admin CLI in; the
    refusals are logged as a couple of lines with counts."""
    with capture_logs() as logs:
        async with serving(tmp_path, max_connections=50, max_per_peer=20, unix_reserve=4,
                           warn_interval=60.0) as srv:
            st = srv.server.conn_stats
            flood = [await srv.tcp("127.0.0.2") for _ in range(200)]
            await _settle(srv, 200)
            assert st.open == 20 and st.refused_by["max_per_peer"] == 180
            busy = await flood[-1].recv()
            assert busy["error"] == {"code": "busy", "message": "too many connections from this address"}
            other = await srv.tcp("127.0.0.3")
            assert (await other.call("ping"))["pong"] is True
            more = [await srv.tcp("127.0.0.3") for _ in range(19)] + [await srv.tcp("127.0.0.4") for _ in range(10)]
            await _settle(srv, 230)
            assert st.open == 50
            late = await srv.tcp("127.0.0.5")
            assert (await late.recv())["error"] == {"code": "busy", "message": "too many connections"}
            stats = await asyncio.to_thread(_stats_over_unix, srv.unix)  # the CLI's client, via the reserve
            assert stats["ok"] is True and stats["connections"]["open"] == 51
            unix = [await srv.unix_client() for _ in range(5)]
            await _settle(srv, 237)
            assert st.open == 54  # 50 + the reserve of 4: the 5th Unix client is refused
            assert (await unix[-1].recv())["error"]["code"] == "busy"
            for c in [*flood, other, *more, late, *unix]:
                await c.close()
            refused = st.refused
    lines = [e for e in logs if e["event"] == "connection_refused"]
    assert 1 <= len(lines) <= 3
    assert sum(e.get("repeated", 1) for e in lines) == refused


async def test_slowloris_closed_at_the_partial_deadline(tmp_path: Path) -> None:
    """One byte every 0.1 s inside one message: the deadline counts from its first byte, so the
    connection is closed after partial_timeout although bytes keep coming."""
    async with serving(tmp_path, partial_timeout=0.5) as srv:
        c = await srv.tcp()
        t0 = time.monotonic()
        await c.send(b'{"op":"ping","pad":"')

        async def trickle() -> None:
            while time.monotonic() - t0 < 5:
                await asyncio.sleep(0.1)
                try:
                    await c.send(b"x")
                except (ConnectionError, OSError):
                    return

        task = asyncio.create_task(trickle())
        rest = await asyncio.wait_for(c.reader.read(), 5)
        elapsed = time.monotonic() - t0
        task.cancel()
        assert orjson.loads(rest)["error"]["code"] == "timeout"
        assert 0.45 <= elapsed < 2.5, elapsed
        await c.close()


async def test_partial_deadline_restarts_for_each_new_message(tmp_path: Path) -> None:
    """A client that completes its messages is never cut off, however its bytes are split."""
    async with serving(tmp_path, partial_timeout=0.3) as srv:
        c = await srv.tcp()
        for i in range(5):
            await c.send(b'{"op":"ping","id":%d' % i)
            await asyncio.sleep(0.2)
            await c.send(b"}\n")
            assert (await c.recv())["id"] == i
        await c.close()


async def test_idle_connection_closed(tmp_path: Path) -> None:
    """A connection with no request for idle_timeout is closed; an active one is not."""
    async with serving(tmp_path, idle_timeout=0.3) as srv:
        idle = await srv.tcp()
        busy = await srv.tcp()
        t0 = time.monotonic()
        for _ in range(8):
            assert (await busy.call("ping"))["pong"] is True
            await asyncio.sleep(0.1)
        assert await asyncio.wait_for(idle.reader.read(), 5) == b""  # closed, no unsolicited bytes
        assert time.monotonic() - t0 >= 0.25
        assert (await busy.call("ping"))["pong"] is True
        assert srv.server.conn_stats.idle_closed == 1
        await idle.close()
        await busy.close()


def _server_side(srv: Served, host: str) -> StreamProtocol:
    [proto] = [p for p in srv.server.conn_stats.connections if p.host == host]
    return proto


async def test_pipelining_without_reading_is_bounded(tmp_path: Path) -> None:
    """A client sends 1,000 profile_list (50 calls held, ~25 KB each) and reads nothing: the server
    stops reading it (never more than max_pending unwritten replies, a write buffer near the
    high-water mark, a bounded read buffer), another client's ping stays fast, and every reply
    still arrives in order."""
    cap = 32
    async with serving(tmp_path, max_pending=cap) as srv:
        c = await srv.tcp()
        for i in range(50):
            await c.call("check", **chk(f"h{i}" + "c" * 200, user=f"u{i}" + "u" * 200, account=f"a{i}"))
        reply_size = len(jline(await c.call("profile_list", profile="total", id=0)))
        assert reply_size > 20000

        loop = asyncio.get_running_loop()
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.bind(("127.0.0.2", 0))
        sock.setblocking(False)
        await loop.sock_connect(sock, ("127.0.0.1", srv.port))
        reader, writer = await asyncio.open_connection(sock=sock, limit=1 << 20)
        pad = "p" * 4000  # 4 MB of requests in all: more than the server may buffer
        writer.write(b"".join(jline({"op": "profile_list", "profile": "total", "id": i, "pad": pad})
                              for i in range(1000)))
        await asyncio.sleep(0.5)
        worst = 0.0
        for _ in range(5):
            t = time.monotonic()
            assert (await c.call("ping"))["pong"] is True
            worst = max(worst, time.monotonic() - t)
            await asyncio.sleep(0.05)
        assert worst < 1.0, worst
        print(f"ping while another client pipelines without reading: worst {worst * 1000:.1f} ms")
        st = srv.server.conn_stats
        proto = _server_side(srv, "127.0.0.2")
        assert st.peak_pending <= cap
        assert proto.transport is not None
        bound = HIGH_WATER + cap * reply_size
        assert proto.transport.get_write_buffer_size() <= bound
        assert st.peak_write_buffer <= bound
        assert proto.decoder.buffered <= 1 << 20  # not reading: the rest waits in the kernel and the client
        assert proto.flow is not None and proto.flow.read_paused
        ids = []
        for _ in range(1000):
            line = await asyncio.wait_for(reader.readline(), 10)
            ids.append(orjson.loads(line)["id"])
        assert ids == list(range(1000))
        writer.close()
        await c.close()


async def test_client_that_never_reads_is_dropped(tmp_path: Path) -> None:
    """A client that pipelines and never reads its replies holds its connection for idle_timeout at
    most: then it is aborted (close() would wait forever for the unread replies)."""
    async with serving(tmp_path, idle_timeout=0.5, max_pending=8) as srv:
        c = await srv.tcp()
        for i in range(20):
            await c.call("check", **chk(f"h{i}" + "c" * 200, user=f"u{i}" + "u" * 200, account=f"a{i}"))
        loop = asyncio.get_running_loop()
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.bind(("127.0.0.2", 0))
        sock.setblocking(False)
        await loop.sock_connect(sock, ("127.0.0.1", srv.port))
        # a bare socket: nothing on this side reads a byte
        sending = asyncio.create_task(loop.sock_sendall(sock, b"".join(
            jline({"op": "profile_list", "profile": "total", "id": i}) for i in range(2000))))
        st = srv.server.conn_stats
        deadline = time.monotonic() + 5
        while st.idle_closed == 0 and time.monotonic() < deadline:
            assert (await c.call("ping"))["pong"] is True  # this one stays active
            await asyncio.sleep(0.05)
        assert st.idle_closed == 1
        await asyncio.sleep(0.05)
        assert not [p for p in st.connections if p.host == "127.0.0.2"]
        assert (await c.call("ping"))["pong"] is True
        sending.cancel()
        sock.close()
        await c.close()


async def test_pending_cap_with_a_store_that_suspends(tmp_path: Path) -> None:
    """When requests wait on the store (as with Redis), at most max_pending are in flight per
    connection; reading resumes as they complete, and replies keep their order."""
    async with serving(tmp_path, max_pending=8) as srv:
        srv.service.store.answers_inline = False  # every request runs as a Task, like on Redis
        c = await srv.tcp()
        await c.send(b"".join(jline({"op": "ping", "id": i}) for i in range(300)))
        assert [(await c.recv())["id"] for _ in range(300)] == list(range(300))
        assert 1 < srv.server.conn_stats.peak_pending <= 8
        await c.close()


# -- background tasks, warnings ---------------------------------------------------------------


async def test_supervised_task_is_restarted_and_counted() -> None:
    """A loop that raises is logged with its traceback and restarted after a backoff; a clean
    return ends it."""
    runs = 0

    async def flaky() -> None:
        nonlocal runs
        runs += 1
        if runs <= 3:
            raise RuntimeError(f"boom {runs}")

    restarts: Counter[str] = Counter()
    with capture_logs() as logs:
        await asyncio.wait_for(supervise("flaky", flaky, restarts, initial=0.01, maximum=0.05), 5)
    assert runs == 4 and restarts["flaky"] == 3
    failed = [e for e in logs if e["event"] == "task_failed"]
    assert [e["restarts"] for e in failed] == [1, 2, 3] and all(e["log_level"] == "error" for e in failed)
    assert all(e.get("exc_info") for e in failed)
    assert [e["retry_in"] for e in failed] == [0.01, 0.02, 0.04]


async def test_server_restarts_a_failed_sweeper(tmp_path: Path) -> None:
    """The sweeper dies on a bug: it is restarted, and `stats` counts it under `tasks`."""
    async with serving(tmp_path, sweep_interval=0.02) as srv:
        store = srv.service.store
        real = store.sweep
        calls = 0

        async def broken(now: float) -> Any:
            nonlocal calls
            calls += 1
            if calls == 1:
                raise RuntimeError("a bug in the sweep")
            return await real(now)

        store.sweep = broken  # type: ignore[method-assign]
        c = await srv.tcp()
        deadline = time.monotonic() + 5
        while calls < 3 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        tasks = (await c.call("stats"))["tasks"]
        assert tasks["sweeper"] == 1 and calls >= 3
        await c.close()


async def test_a_flood_of_bad_messages_logs_a_few_lines(tmp_path: Path) -> None:
    """1,000 bad messages: each answered, the connection stays; the log gets one line at once and
    one per interval with `repeated`, not 1,000."""
    with capture_logs() as logs:
        async with serving(tmp_path, warn_interval=0.3) as srv:
            c = await srv.tcp()
            await c.send(b"garbage\n" * 1000)
            replies = [await c.recv() for _ in range(1000)]
            assert {r["error"]["code"] for r in replies} == {"invalid_json"}
            assert (await c.call("ping"))["pong"] is True
            await asyncio.sleep(0.5)
            await c.close()
    lines = [e for e in logs if e["event"] == "bad_request"]
    assert 2 <= len(lines) <= 4
    assert sum(e.get("repeated", 1) for e in lines) == 1000


def test_rate_limited_log_counts_everything() -> None:
    """Without an event loop too: nothing is lost, it is counted into the next line."""
    now = [0.0]
    got: list[tuple[str, dict[str, Any]]] = []

    class Sink:
        def warning(self, event: str, **kw: Any) -> None:
            got.append((event, kw))

    rl = RateLimitedLog(Sink(), 10.0, clock=lambda: now[0])
    for i in range(100):
        rl.warning("x", n=i)
    assert got == [("x", {"n": 0})]
    now[0] = 11.0
    rl.warning("x", n=100)
    assert got[1] == ("x", {"n": 100, "repeated": 100, "interval": 10.0})
    rl.warning("y", n=0)
    assert got[2] == ("y", {"n": 0})


# -- the Unix socket file ----------------------------------------------------------------------


async def test_unix_socket_mode_and_group(tmp_path: Path) -> None:
    """The socket file is 0660 by default (never world-accessible), or the configured mode/group."""
    async with serving(tmp_path) as srv:
        assert stat.S_IMODE(os.stat(srv.unix).st_mode) == 0o660
    other = next((g for g in grp.getgrall() if g.gr_gid != os.getgid()), None)
    if other is None:
        pytest.skip("no second group on this machine")
    async with serving(tmp_path, unix_mode=0o600, unix_group=other.gr_name) as srv:
        st = os.stat(srv.unix)
        assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_gid == other.gr_gid
        c = await AClient.unix(srv.unix)
        assert (await c.call("ping"))["pong"] is True
        await c.close()
    cfg = tmp_path / "service.toml"
    cfg.write_text("[listen]\nunix_mode = 0o666\n")
    with pytest.raises(SettingsError, match="0666 lets every local user connect"):
        load_settings(cfg)
