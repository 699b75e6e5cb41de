"""Who may ask (issue 9): tokens and roles over real sockets, Unix peers by uid, listeners that
refuse to be exposed without authentication, the CLI's token, secrets never logged."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
from structlog.testing import capture_logs

from policy.auth import Allowlist, ListenerRefused, Tokens, check_listeners, is_loopback
from policy.errors import SettingsError
from policy.server import Server
from policy.settings import Settings, load_settings, load_tokens
from tests.helpers import ROOT, LineClient, ServiceProcess, free_port
from tests.inproc import ADMIN, PROXY, WITH_TOKENS, authed, serving
from tests.test_service import chk

ADMIN_OPS = [("stats", {}), ("reload", {}), ("profile_list", {"profile": "total"}),
             ("profile_size", {"profile": "total"}), ("profile_values", {"profile": "account"}),
             ("release", {"call_id": "held"}), ("reconcile", {})]


async def test_missing_and_wrong_token_refused_no_counter_changed(tmp_path: Path) -> None:
    """With tokens configured a TCP client must `auth` first: a request before it, or a wrong token,
    gets a clear error, changes no counter, and the connection stays usable."""
    async with serving(tmp_path, tokens=WITH_TOKENS) as srv:
        c = await srv.tcp()
        r = await c.call("check", id=1, **chk("x1"))
        assert r == {"id": 1, "ok": False, "error": {"code": "unauthenticated",
                                                     "message": 'send {"op":"auth","token":...} first'}}
        r = await c.call("auth", token="not-the-secret-at-all")
        assert r["ok"] is False and r["error"] == {"code": "auth_failed", "message": "unknown token"}
        r = await c.call("answer", call_id="x1", timeout=60, create=True)
        assert r["error"]["code"] == "unauthenticated"
        svc = srv.service
        now = srv.clock.now()
        assert await svc.store.profile_size("total", None, now) == 0
        assert svc.totals.get("allow", 0) == 0 and not svc.decisions
        # the same connection, with the right token, now works
        r = await c.call("auth", token=PROXY)
        assert r["ok"] and r["role"] == "proxy" and r["name"] == "kamailio-1"
        assert (await c.call("check", **chk("x1")))["decision"] == "allow"
        assert await svc.store.profile_size("total", None, now) == 1
        await c.close()


async def test_proxy_token_cannot_run_admin_ops(tmp_path: Path) -> None:
    """A proxy token may check/answer/refresh/end/ping, never reload, list calls, read stats or
    release: each is `forbidden` and changes nothing."""
    async with serving(tmp_path, tokens=WITH_TOKENS) as srv:
        c = await authed(await srv.tcp(), PROXY)
        assert (await c.call("check", **chk("held")))["decision"] == "allow"
        assert (await c.call("answer", call_id="held"))["found"] is True
        assert (await c.call("refresh", call_id="held", timeout=60))["found"] is True
        assert (await c.call("ping"))["pong"] is True
        for op, fields in ADMIN_OPS:
            r = await c.call(op, **fields)
            assert r["ok"] is False and r["error"]["code"] == "forbidden", (op, r)
            assert f"op {op!r} needs the admin role (this connection has proxy)" == r["error"]["message"]
        svc = srv.service
        assert svc.reloads == 0
        assert await svc.store.profile_size("total", None, srv.clock.now()) == 1  # release did nothing
        assert (await c.call("end", call_id="held"))["released"] is True
        await c.close()


async def test_admin_token_may_do_everything(tmp_path: Path) -> None:
    """An admin token runs the admin ops (and the proxy ones)."""
    async with serving(tmp_path, tokens=WITH_TOKENS) as srv:
        c = await authed(await srv.tcp(), ADMIN)
        assert (await c.call("check", **chk("held")))["decision"] == "allow"
        assert (await c.call("stats"))["decisions"] == {"allow": 1}
        assert (await c.call("reload"))["ok"] is True
        [call] = (await c.call("profile_list", profile="total"))["calls"]
        assert call["call_id"] == "held"
        assert (await c.call("release", call_id="held"))["released"] == 1
        assert srv.service.reloads == 1
        await c.close()


async def test_no_tokens_loopback_tcp_is_admin_and_says_so(tmp_path: Path) -> None:
    """Without tokens TCP is loopback-only and every client admin; the start line says so."""
    with capture_logs() as logs:
        async with serving(tmp_path) as srv:
            c = await srv.tcp()
            assert (await c.call("stats"))["ok"] is True
            await c.close()
    [listening] = [e for e in logs if e["event"] == "listening"]
    assert listening["auth"]["tcp"] == "none (loopback only)"
    assert listening["auth"]["udp"] == "proxy ops from 127.0.0.0/8,::1/128"


async def test_unix_peer_by_peercred_uid(tmp_path: Path) -> None:
    """A Unix peer's role comes from its uid as the kernel reports it (SO_PEERCRED)."""
    me = os.getuid()
    async with serving(tmp_path, tokens=WITH_TOKENS) as srv:  # default: own uid and root are admin
        c = await srv.unix_client()
        assert (await c.call("stats"))["ok"] is True
        await c.close()
    async with serving(tmp_path, tokens=WITH_TOKENS, unix_admin_uids=[me + 4242], unix_proxy_uids=[me]) as srv:
        c = await srv.unix_client()
        assert (await c.call("check", **chk("u1")))["decision"] == "allow"
        r = await c.call("stats")
        assert r["error"]["code"] == "forbidden" and "has proxy" in r["error"]["message"]
        await c.close()
    async with serving(tmp_path, tokens=WITH_TOKENS, unix_admin_uids=[me + 4242]) as srv:
        c = await srv.unix_client()
        assert (await c.call("stats"))["error"]["code"] == "unauthenticated"
        await authed(c, ADMIN)
        assert (await c.call("stats"))["ok"] is True
        await c.close()


async def test_non_loopback_tcp_refused_without_tokens(tmp_path: Path) -> None:
    """Binding 0.0.0.0 without tokens is refused before any socket is opened, naming the fix."""
    port = free_port()
    settings = Settings(tcp=f"0.0.0.0:{port}", udp=None, unix=None, rules=str(ROOT / "rules"), snapshot=None,
                        watch=False, metrics=None, base_dir=tmp_path)
    with pytest.raises(SettingsError) as err:
        await Server(settings).start()
    assert err.value.key == "listen.tcp"
    assert "TCP on 0.0.0.0 would let anyone who reaches it run every op: configure [auth] tokens" in str(err.value)
    assert "insecure = true" in str(err.value)
    with socket.socket() as s:  # nothing was bound
        s.bind(("127.0.0.1", port))


def test_listener_check_rules() -> None:
    """The bind check itself (the override is tested here, not by binding every interface, to keep
    tests on loopback): insecure turns the refusal into a warning; tokens make TCP fine; UDP needs a
    udp_allow that names networks, neither every source nor loopback only."""
    none, some = Tokens([]), Tokens(WITH_TOKENS)
    lo = Allowlist(["127.0.0.0/8", "::1/128"])
    lan = Allowlist(["192.0.2.0/24"])
    anyone = Allowlist(["0.0.0.0/0"])
    assert check_listeners("127.0.0.1", "127.0.0.1", none, lo, False) == []
    assert check_listeners("localhost", "::1", none, lo, False) == []
    with pytest.raises(ListenerRefused):
        check_listeners("0.0.0.0", None, none, lo, False)
    with pytest.raises(ListenerRefused):
        check_listeners("192.0.2.2", None, none, lo, False)
    [warning] = check_listeners("0.0.0.0", None, none, lo, True)
    assert warning.startswith("insecure: TCP on 0.0.0.0 would let anyone")
    assert check_listeners("0.0.0.0", "0.0.0.0", some, lan, False) == []
    with pytest.raises(ListenerRefused) as err:
        check_listeners(None, "0.0.0.0", some, lo, False)
    assert err.value.key == "listen.udp_allow" and "would drop every datagram" in err.value.message
    with pytest.raises(ListenerRefused):
        check_listeners(None, "0.0.0.0", some, anyone, False)
    assert len(check_listeners(None, "0.0.0.0", some, anyone, True)) == 1
    assert is_loopback("127.0.0.2") and is_loopback("::1") and is_loopback("::ffff:127.0.0.1")
    assert not is_loopback("0.0.0.0") and not is_loopback("::") and not is_loopback("")


async def test_security_warnings_are_logged_at_start(tmp_path: Path) -> None:
    """`insecure = true` turns the refusal into a warning (from the same check the server runs), and
    the server logs its security warnings at start: here a tokens file others may read."""
    settings = Settings(tcp="0.0.0.0:1", udp=None, unix=None, insecure=True)
    _tokens, _allow, warnings = Server(settings).security()
    assert len(warnings) == 1 and warnings[0].startswith("insecure: TCP on 0.0.0.0 would let anyone")
    tf = tmp_path / "tokens.toml"
    tf.write_text(f'tokens = [{{ name = "ops", role = "admin", secret = "{ADMIN}" }}]\n')
    tf.chmod(0o644)
    with capture_logs() as logs:
        async with serving(tmp_path, tokens_file=str(tf)):
            pass
    [warning] = [e for e in logs if e["event"] == "security"]
    assert warning["log_level"] == "warning" and "tokens.toml is readable by group or others" in warning["warning"]


async def test_tokens_never_logged(tmp_path: Path) -> None:
    """Neither a presented (wrong or right) token nor a configured secret appears in any log line."""
    wrong = "wrong-secret-that-must-not-be-logged"
    with capture_logs() as logs:
        async with serving(tmp_path, tokens=WITH_TOKENS) as srv:
            c = await srv.tcp()
            await c.call("auth", token=wrong)
            await c.call("auth", token=ADMIN)
            await c.call("auth", token=12345)
            await c.send(b'{"op":"auth","token":"' + PROXY.encode() + b'"')  # broken JSON
            await c.send(b"\n")
            await c.recv()
            await c.close()
    text = repr(logs)
    assert "listening" in text and "ops (admin)" in text
    for secret in (wrong, ADMIN, PROXY):
        assert secret not in text
    assert ADMIN not in repr(WITH_TOKENS)


def test_token_settings(tmp_path: Path) -> None:
    """[auth] tokens and tokens_file: loaded together; errors name the file and key and never show
    a secret; a group/world-readable tokens file is reported."""
    tf = tmp_path / "tokens.toml"
    tf.write_text(f'tokens = [{{ name = "ops", role = "admin", secret = "{ADMIN}" }}]\n')
    tf.chmod(0o600)
    cfg = tmp_path / "service.toml"
    cfg.write_text(f'[auth]\ntokens_file = "tokens.toml"\n'
                   f'tokens = [{{ name = "k1", role = "proxy", secret = "{PROXY}" }}]\n')
    cfg.chmod(0o600)
    tokens, warnings = load_tokens(load_settings(cfg))
    assert [(t.name, t.role) for t in tokens.tokens] == [("k1", "proxy"), ("ops", "admin")]
    assert warnings == []
    tf.chmod(0o644)
    cfg.chmod(0o644)
    _tokens, warnings = load_tokens(load_settings(cfg))
    assert any("tokens.toml is readable by group or others (mode 0644): chmod 600 it" in w for w in warnings)
    assert any("service.toml holds [auth] tokens and is readable by group or others" in w for w in warnings)
    for body, key, msg in [
        ('tokens = [{ name = "a", role = "root", secret = "0123456789abcdef" }]', "auth.tokens[0].role",
         "must be one of proxy, admin"),
        ('tokens = [{ name = "a", role = "proxy", secret = "short-secret" }]', "auth.tokens[0].secret",
         "is shorter than 16 characters"),
        ('tokens = [{ name = "a", role = "proxy" }]', "auth.tokens[0].secret", "is required"),
        ('tokens = [{ name = "a", role = "proxy", secret = "0123456789abcdef", x = 1 }]', "auth.tokens[0].x",
         "unknown key"),
    ]:
        cfg.write_text(f"[auth]\n{body}\n")
        with pytest.raises(SettingsError) as err:
            load_settings(cfg)
        assert err.value.key == key and msg in err.value.message
        assert "short-secret" not in str(err.value) and "0123456789abcdef" not in str(err.value)
    cfg.write_text('[auth]\ntokens = [{ name = "a", role = "proxy", secret = "0123456789abcdef" },'
                   ' { name = "a", role = "admin", secret = "fedcba9876543210" }]\n')
    with pytest.raises(SettingsError, match="two tokens are named 'a'"):
        load_tokens(load_settings(cfg))
    cfg.write_text('[auth]\ntokens_file = "missing.toml"\n')
    with pytest.raises(SettingsError, match=r"auth\.tokens_file.*cannot read"):
        load_tokens(load_settings(cfg))


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full = dict(os.environ)
    full.pop("CALLPOLICY_TOKEN", None)
    full.update(env or {})
    return subprocess.run([sys.executable, "-m", "policy", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=30, env=full)


def test_cli_reads_its_token_from_the_config(tmp_path: Path) -> None:
    """The real process with tokens: the CLI finds the admin token in the tokens file, or in
    $CALLPOLICY_TOKEN; a proxy token is refused admin commands with a hint; a raw TCP client
    without a token is refused."""
    tf = tmp_path / "tokens.toml"
    tf.write_text(f'tokens = [{{ name = "ops", role = "admin", secret = "{ADMIN}" }},'
                  f' {{ name = "k1", role = "proxy", secret = "{PROXY}" }}]\n')
    tf.chmod(0o600)
    cfg = tmp_path / "service.toml"
    cfg.write_text('[auth]\ntokens_file = "tokens.toml"\n[metrics]\nlisten = false\n')
    bare = tmp_path / "bare.toml"
    bare.write_text("[metrics]\nlisten = false\n")
    with ServiceProcess(workdir=tmp_path, config=cfg) as svc:
        srv = f"127.0.0.1:{svc.port}"
        c = LineClient(port=svc.port)
        assert c.call("stats")["error"]["code"] == "unauthenticated"
        c.close()
        r = _cli("--config", str(cfg), "stats", "--server", srv)
        assert r.returncode == 0 and "dialog:active_dialogs = 0" in r.stdout, r.stderr
        r = _cli("--config", str(cfg), "reload", "--server", srv, env={"CALLPOLICY_TOKEN": PROXY})
        assert r.returncode == 1 and "error: forbidden: op 'reload' needs the admin role" in r.stderr
        assert "hint: admin commands need an admin token" in r.stderr
        r = _cli("--config", str(bare), "reload", "--server", srv, env={"CALLPOLICY_TOKEN": ADMIN})
        assert r.returncode == 0 and r.stdout.startswith("reloaded")
        r = _cli("--config", str(bare), "stats", "--server", srv)
        assert r.returncode == 1 and "error: unauthenticated" in r.stderr
        r = _cli("--config", str(bare), "stats", "--server", srv, env={"CALLPOLICY_TOKEN": "x" * 20})
        assert r.returncode == 2 and "refused the token: auth_failed: unknown token" in r.stderr
        assert "x" * 20 not in r.stderr
        # the Unix socket: this uid is admin without any token; without --server/--unix the CLI
        # prefers the configured socket (nothing listens on the configured TCP port here)
        r = _cli("--config", str(bare), "stats", "--unix", svc.unix)
        assert r.returncode == 0, r.stderr
        local = tmp_path / "local.toml"
        local.write_text(f'[listen]\ntcp = "127.0.0.1:1"\nunix = "{svc.unix}"\n')
        r = _cli("--config", str(local), "stats")
        assert r.returncode == 0 and "dialog:active_dialogs = 0" in r.stdout, r.stderr
    events = svc.log_events()
    [listening] = [e for e in events if e["event"] == "listening"]
    assert listening["auth"]["tcp"] == "tokens: ops (admin), k1 (proxy)"
    assert ADMIN not in svc.log() and PROXY not in svc.log()


def test_serve_refuses_a_public_bind_without_tokens(tmp_path: Path) -> None:
    """`callpolicy serve --listen 0.0.0.0:PORT` without tokens exits 2 with the reason."""
    cfg = tmp_path / "service.toml"
    cfg.write_text("[metrics]\nlisten = false\n")
    r = _cli("--config", str(cfg), "serve", "--rules", str(ROOT / "rules"), "--listen", f"0.0.0.0:{free_port()}",
             "--unix", "none", "--snapshot", "none")
    assert r.returncode == 2
    assert "key 'listen.tcp': TCP on 0.0.0.0 would let anyone who reaches it run every op" in r.stderr


async def test_udp_cannot_auth(tmp_path: Path) -> None:
    """A datagram cannot authenticate (each one stands alone): `auth` over UDP is refused."""
    async with serving(tmp_path, tokens=WITH_TOKENS) as srv:
        pad = "x" * 200
        reply = await srv.udp(orjson.dumps({"op": "auth", "token": ADMIN, "pad": pad}))
        assert reply is not None
        assert orjson.loads(reply)["error"]["code"] == "forbidden"
