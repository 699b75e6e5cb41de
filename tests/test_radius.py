"""RADIUS front end: a real `callpolicy serve` with `[radius]`, radclient and raw UDP as clients."""

from __future__ import annotations

import shutil
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pyrad import packet as rp
from pyrad.dictionary import Dictionary

from policy.auth import LOCAL, Peer
from policy.clock import ManualClock
from policy.errors import SettingsError
from policy.radius import DICTIONARY
from policy.radius.adapter import Mapping
from policy.radius.clients import ClientTable
from policy.radius.packet import check as check_packet
from policy.radius.packet import parse as parse_packet
from policy.settings import RadiusClient
from policy.store.embedded import EmbeddedStore
from tests.helpers import RULES, ServiceProcess, free_port

SECRET = "testing123"
RADCLIENT = shutil.which("radclient")
needs_radclient = pytest.mark.skipif(RADCLIENT is None, reason="radclient not installed (freeradius-utils)")

# radclient knows the RFC attributes; these are the SIP ones our tests send or read back.
RADCLIENT_DICT = """\
ATTRIBUTE	Sip-Response-Code	102	integer
ATTRIBUTE	SIP-AVP			225	string
ATTRIBUTE	Sip-From-Tag		105	string
VALUE	Acct-Status-Type	Failed	15
"""


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return f'"{value}"'


class Radius:
    """A service with a [radius] table, and the ways to talk to it."""

    def __init__(self, tmp: Path, clients: list[dict[str, Any]], extra: str = "", radius_extra: str = "") -> None:
        self.tmp = tmp
        self.auth = free_port()
        self.acct = free_port()
        lines = ", ".join("{" + ", ".join(f"{k} = {_toml(v)}" for k, v in c.items()) + "}" for c in clients)
        cfg = tmp / "service.toml"
        cfg.write_text(
            f'[rules]\ndir = "{RULES}"\nwatch = false\n\n{extra}\n'
            f'[radius]\nauth = "127.0.0.1:{self.auth}"\nacct = "127.0.0.1:{self.acct}"\n'
            f"clients = [{lines}]\n{radius_extra}")
        (tmp / "raddb").mkdir()
        (tmp / "raddb" / "dictionary").write_text(RADCLIENT_DICT)
        self.svc = ServiceProcess(config=cfg, workdir=tmp)
        self.dict = Dictionary(str(DICTIONARY))

    def start(self) -> Radius:
        self.svc.start()
        # the TCP listener answers ping before the RADIUS front end is registered (it starts
        # after the listeners): wait for it, or a test's first `stats` may come too early
        deadline = time.monotonic() + 10.0
        while "radius" not in self.call("stats") and time.monotonic() < deadline:
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.svc.stop()

    # -- radclient ---------------------------------------------------------------------------

    def radclient(self, kind: str, attrs: str, secret: str = SECRET, timeout: float = 1.0) -> tuple[int, str]:
        """Send one packet with radclient; (exit code, output)."""
        assert RADCLIENT is not None
        port = self.auth if kind == "auth" else self.acct
        proc = subprocess.run(
            [RADCLIENT, "-d", str(self.tmp / "raddb"), "-x", "-r", "1", "-t", str(timeout),
             f"127.0.0.1:{port}", kind, secret],
            input=attrs.encode(), capture_output=True, timeout=30)
        return proc.returncode, proc.stdout.decode(errors="replace") + proc.stderr.decode(errors="replace")

    def check(self, call_id: str, account: str = "acme", **more: str) -> tuple[int, str]:
        attrs = [f'User-Name = "{account}"', f'Acct-Session-Id = "{call_id}"',
                 'Calling-Station-Id = "sip:alice@example.com"', 'Called-Station-Id = "sip:bob@example.com"',
                 "Message-Authenticator = 0x00"]
        attrs += [f'{k.replace("_", "-")} = "{v}"' for k, v in more.items()]
        return self.radclient("auth", ", ".join(attrs))

    def acct_status(self, call_id: str, status: str, account: str = "acme", secret: str = SECRET,
                    extra: str = "") -> tuple[int, str]:
        attrs = (f'User-Name = "{account}", Acct-Session-Id = "{call_id}", Acct-Status-Type = {status}, '
                 'Calling-Station-Id = "sip:alice@example.com", Called-Station-Id = "sip:bob@example.com"')
        return self.radclient("acct", attrs + extra, secret=secret)

    # -- raw UDP with pyrad ------------------------------------------------------------------

    def raw(self, data: bytes, port: int | None = None, timeout: float = 0.3,
            sock: socket.socket | None = None) -> bytes | None:
        """Send bytes; the reply or None."""
        own = sock is None
        s = sock or socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            s.settimeout(timeout)
            s.sendto(data, ("127.0.0.1", port or self.auth))
            try:
                return s.recv(8192)
            except TimeoutError:
                return None
        finally:
            if own:
                s.close()

    def acct_packet(self, call_id: str, status: int, secret: str = SECRET) -> rp.AcctPacket:
        pkt = rp.AcctPacket(secret=secret.encode(), dict=self.dict)
        pkt["User-Name"] = "acme"
        pkt["Acct-Session-Id"] = call_id
        pkt["Acct-Status-Type"] = status
        return pkt

    # -- the service's own protocol ----------------------------------------------------------

    def call(self, op: str, **fields: Any) -> dict[str, Any]:
        c = self.svc.client()
        try:
            return c.call(op, **fields)
        finally:
            c.close()

    def size(self, account: str = "acme") -> int:
        return int(self.call("profile_size", profile="account", value=account)["size"])

    def stats(self) -> dict[str, Any]:
        r: dict[str, Any] = self.call("stats")["radius"]
        return r


@pytest.fixture(scope="module")
def reject(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Radius]:
    r = Radius(tmp_path_factory.mktemp("radius-reject"),
               [{"address": "127.0.0.0/8", "secret": SECRET, "style": "reject", "name": "lo"}],
               extra="[dialogs]\ndefault_timeout = 60\n").start()
    yield r
    r.stop()


@pytest.fixture(scope="module")
def avp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Radius]:
    r = Radius(tmp_path_factory.mktemp("radius-avp"),
               [{"address": "127.0.0.1", "secret": SECRET, "style": "avp", "name": "kamailio"}]).start()
    yield r
    r.stop()


def _release(r: Radius, *call_ids: str) -> None:
    for cid in call_ids:
        r.call("end", call_id=cid, reason="bye")


# -- Access-Request -> check ------------------------------------------------------------------


@needs_radclient
@pytest.mark.radius
def test_allow_reject_style(reject: Radius) -> None:
    rc, out = reject.check("allow-1", account="acme")
    assert rc == 0, out
    assert "Received Access-Accept" in out
    assert "Reply-Message" not in out
    assert reject.size("acme") == 1
    _release(reject, "allow-1")
    assert reject.size("acme") == 0


@needs_radclient
@pytest.mark.radius
def test_deny_reject_style(reject: Radius) -> None:
    ids = [f"rj-{i}" for i in range(3)]
    for cid in ids:
        _rc, out = reject.check(cid)
        assert "Received Access-Accept" in out, out
    _rc, out = reject.check("rj-over")
    assert "Received Access-Reject" in out, out
    assert 'Reply-Message = "Account call limit reached"' in out
    assert reject.size("acme") == 3
    _release(reject, *ids)
    assert reject.size("acme") == 0


@needs_radclient
@pytest.mark.radius
def test_allow_and_deny_avp_style(avp: Radius) -> None:
    rc, out = avp.check("av-0")
    assert rc == 0 and "Received Access-Accept" in out, out
    assert 'SIP-AVP = "policy:allow"' in out
    for cid in ("av-1", "av-2"):
        avp.check(cid)
    rc, out = avp.check("av-over")
    # misc_radius cannot tell a reject from a timeout: the deny is an Accept with AVPs
    assert rc == 0 and "Received Access-Accept" in out, out
    assert 'SIP-AVP = "policy:deny"' in out
    assert 'SIP-AVP = "policy_code#486"' in out
    assert 'SIP-AVP = "policy_reason:Account call limit reached"' in out
    assert 'SIP-AVP = "policy_rule:account-cap"' in out
    assert avp.size("acme") == 3
    _release(avp, "av-0", "av-1", "av-2")
    assert avp.size("acme") == 0


@needs_radclient
@pytest.mark.radius
def test_check_without_call_id_is_an_error_reply(reject: Radius, avp: Radius) -> None:
    _rc, out = reject.radclient("auth", 'User-Name = "acme", Message-Authenticator = 0x00')
    assert "Received Access-Reject" in out and "call_id" in out, out
    _rc, out = avp.radclient("auth", 'User-Name = "acme", Message-Authenticator = 0x00')
    assert "Received Access-Accept" in out and 'SIP-AVP = "policy:error"' in out, out


# -- Accounting-Request -> answer / refresh / end ---------------------------------------------


@needs_radclient
@pytest.mark.radius
def test_start_stop_accounting_only(reject: Radius) -> None:
    rc, out = reject.acct_status("acct-1", "Start")
    assert rc == 0 and "Received Accounting-Response" in out, out
    assert reject.size("acme") == 1  # created: no check was seen
    rc, out = reject.acct_status("acct-1", "Stop")
    assert rc == 0 and "Received Accounting-Response" in out, out
    assert reject.size("acme") == 0


@needs_radclient
@pytest.mark.radius
def test_check_start_stop_and_failed(reject: Radius) -> None:
    reject.check("life-1")
    reject.check("life-2")
    assert reject.size("acme") == 2
    assert reject.acct_status("life-1", "Start")[0] == 0
    assert reject.size("acme") == 2  # answered, not counted twice
    assert reject.acct_status("life-1", "Stop")[0] == 0
    rc, out = reject.acct_status("life-2", "Failed", extra=", Sip-Response-Code = 487")
    assert rc == 0, out
    assert reject.size("acme") == 0
    s = reject.stats()
    assert s["acct_stop"] >= 1 and s["acct_failed"] >= 1


@needs_radclient
@pytest.mark.radius
def test_interim_extends_the_lease(reject: Radius) -> None:
    reject.acct_status("int-1", "Start")
    first = reject.call("profile_list", profile="account", value="acme")["calls"]
    assert [c["call_id"] for c in first] == ["int-1"]
    time.sleep(1.2)
    rc, out = reject.acct_status("int-1", "Interim-Update")
    assert rc == 0 and "Received Accounting-Response" in out, out
    second = reject.call("profile_list", profile="account", value="acme")["calls"]
    assert second[0]["expires"] >= first[0]["expires"] + 1.0
    reject.acct_status("int-1", "Stop")
    assert reject.size("acme") == 0


def test_duplicates_are_answered_not_applied_twice(reject: Radius) -> None:
    before = reject.stats()
    start = reject.acct_packet("dup-1", 1)
    start_raw = start.RequestPacket()
    stop_raw = reject.acct_packet("dup-1", 2).RequestPacket()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        a = reject.raw(start_raw, reject.acct, sock=s)
        b = reject.raw(start_raw, reject.acct, sock=s)  # retransmission
        assert a is not None and a == b
        assert reject.size("acme") == 1
        assert reject.raw(stop_raw, reject.acct, sock=s) is not None
        assert reject.size("acme") == 0
        # a late retransmission of the Start must not bring the call back
        assert reject.raw(start_raw, reject.acct, sock=s) == a
        assert reject.size("acme") == 0
    reply = start.CreateReply(packet=a)
    assert start.VerifyReply(reply, a)
    after = reject.stats()
    assert after["duplicates"] - before["duplicates"] == 2
    assert after["acct_start"] - before.get("acct_start", 0) == 1


def test_access_request_duplicate_same_answer(reject: Radius) -> None:
    pkt = rp.AuthPacket(secret=SECRET.encode(), dict=reject.dict)
    pkt["User-Name"] = "acme"
    pkt["Acct-Session-Id"] = "dup-auth"
    pkt.add_message_authenticator()
    raw = pkt.RequestPacket()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        a = reject.raw(raw, sock=s)
        b = reject.raw(raw, sock=s)
    assert a is not None and a == b
    reply = pkt.CreateReply(packet=a)
    assert reply.code == rp.AccessAccept and pkt.VerifyReply(reply, a)
    assert reject.size("acme") == 1
    _release(reject, "dup-auth")


# -- dropped, never answered ------------------------------------------------------------------


@needs_radclient
@pytest.mark.radius
def test_wrong_secret_ignored(reject: Radius) -> None:
    before = reject.stats()["drop_reasons"]
    rc, out = reject.acct_status("ws-1", "Start", secret="not-the-secret")
    assert rc != 0 and "No reply" in out, out
    assert reject.size("acme") == 0
    rc, out = reject.radclient("auth", 'User-Name = "acme", Acct-Session-Id = "ws-2", '
                                       "Message-Authenticator = 0x00", secret="not-the-secret")
    assert rc != 0 and "No reply" in out, out
    assert reject.size("acme") == 0
    after = reject.stats()["drop_reasons"]
    assert after.get("bad_authenticator", 0) - before.get("bad_authenticator", 0) >= 1
    assert after.get("bad_message_authenticator", 0) - before.get("bad_message_authenticator", 0) >= 1
    events = [e for e in reject.svc.log_events() if e.get("event") == "radius_dropped"]
    assert any(e["reason"] == "bad_authenticator" and e["level"] == "warning" for e in events)


@needs_radclient
@pytest.mark.radius
def test_unknown_client_ignored(tmp_path: Path) -> None:
    r = Radius(tmp_path, [{"address": "192.0.2.0/24", "secret": SECRET, "name": "elsewhere"}]).start()
    try:
        rc, out = r.check("uc-1")
        assert rc != 0 and "No reply" in out, out
        rc, out = r.acct_status("uc-2", "Start")
        assert rc != 0 and "No reply" in out, out
        assert r.size("acme") == 0
        s = r.stats()
        assert s["drop_reasons"]["unknown_client"] >= 2 and s["answered"] == 0
    finally:
        r.stop()


def _auth_bytes(r: Radius, call_id: str = "mal") -> bytes:
    pkt = rp.AuthPacket(secret=SECRET.encode(), dict=r.dict)
    pkt["User-Name"] = "acme"
    pkt["Acct-Session-Id"] = call_id
    pkt.add_message_authenticator()
    return bytes(pkt.RequestPacket())


def test_malformed_packets_ignored(reject: Radius) -> None:
    good = _auth_bytes(reject)
    length = len(good)
    body = good[20:]
    bad = {
        "empty": b"",
        "truncated header": good[:12],
        "truncated body": good[: length - 3],
        "length field too big": good[:2] + struct.pack("!H", length + 40) + good[4:],
        "length field too small": good[:2] + struct.pack("!H", 12) + good[4:],
        "length field huge": good[:2] + struct.pack("!H", 65000) + good[4:] + b"\0" * 5000,
        "attribute length 0": good[:2] + struct.pack("!H", length + 2) + good[4:] + b"\x01\x00",
        "attribute length 1": good[:2] + struct.pack("!H", length + 2) + good[4:] + b"\x01\x01",
        "attribute overruns": good[:20] + bytes([body[0], 250]) + body[2:],
        "half an attribute header": good[:2] + struct.pack("!H", length + 1) + good[4:] + b"\x01",
        "short Message-Authenticator": good[:2] + struct.pack("!H", length + 6) + good[4:] + b"\x50\x06abcd",
        "unexpected code": bytes([2]) + good[1:],
        "garbage": b"\xff" * 64,
    }
    before = reject.stats()
    for name, data in bad.items():
        assert reject.raw(data, timeout=0.15) is None, name
        assert reject.raw(data, reject.acct, timeout=0.05) is None, name
    after = reject.stats()
    assert after["dropped"] - before["dropped"] == 2 * len(bad)
    assert after["answered"] == before["answered"]
    # still serving
    assert reject.call("ping")["ok"]
    reply = reject.raw(_auth_bytes(reject, "after-malformed"))
    assert reply is not None and reply[0] == rp.AccessAccept
    _release(reject, "after-malformed")


def test_status_server(reject: Radius) -> None:
    pkt = rp.AuthPacket(code=rp.StatusServer, secret=SECRET.encode(), dict=reject.dict)
    pkt.add_message_authenticator()
    raw = pkt.RequestPacket()
    data = reject.raw(raw)
    assert data is not None
    reply = pkt.CreateReply(packet=data)
    assert reply.code == rp.AccessAccept and pkt.VerifyReply(reply, data)


def test_stats_counters(reject: Radius) -> None:
    s = reject.stats()
    for key in ("received", "answered", "dropped", "duplicates", "drop_reasons"):
        assert key in s
    assert s["received"] >= s["answered"]


# -- in-process pieces ------------------------------------------------------------------------


def test_check_packet_reasons() -> None:
    assert check_packet(b"\x01\x00\x00\x14" + b"\0" * 16) is None
    assert check_packet(b"\x01\x00") == "truncated"
    assert check_packet(b"\x01\x00\x00\x13" + b"\0" * 16) == "bad_length"
    assert check_packet(b"\x01\x00\x00\x30" + b"\0" * 16) == "truncated"
    assert check_packet(b"\x01\x00\x00\x16" + b"\0" * 16 + b"\x01\x00") == "bad_attribute_length"


def test_mapping_defaults_and_overrides() -> None:
    d = Dictionary(str(DICTIONARY))
    pkt = rp.AuthPacket(secret=b"s", dict=d)
    pkt["User-Name"] = "acme"
    pkt["Acct-Session-Id"] = "c1"
    pkt["Calling-Station-Id"] = "sip:a@x"
    pkt["Called-Station-Id"] = "sip:b@y"
    pkt["NAS-IP-Address"] = "192.0.2.7"
    pkt["Sip-URI-User"] = "alice"
    attrs = parse_packet(pkt.RequestPacket())
    assert Mapping(d, {}).fields(attrs.attrs) == {"call_id": "c1", "account": "acme", "from_": "sip:a@x",
                                                  "to": "sip:b@y", "src_ip": "192.0.2.7"}
    m = Mapping(d, {"Sip-URI-User": "account", "User-Name": "attrs.user", "NAS-IP-Address": ""})
    assert m.fields(attrs.attrs) == {"call_id": "c1", "account": "alice", "from_": "sip:a@x", "to": "sip:b@y",
                                     "attrs": {"user": "acme"}}


def test_client_table_most_specific_wins() -> None:
    t = ClientTable([RadiusClient("127.0.0.0/8", "a", "reject", "net"),
                     RadiusClient("127.0.0.1", "b", "avp", "host")])
    c = t.match("127.0.0.1")
    assert c is not None and c.name == "host" and c.style == "avp"
    c = t.match("127.0.0.2")
    assert c is not None and c.name == "net"
    assert t.match("192.0.2.1") is None
    assert t.match("::ffff:127.0.0.1") is not None
    # the calls a client admits belong to its node: the entry's name, plus the source for a network
    host = t.match("127.0.0.1")
    net = t.match("127.0.0.9")
    assert host is not None and net is not None
    assert host.peer("127.0.0.1").node == "radius:host" and host.peer("127.0.0.1").role == "proxy"
    assert net.peer("127.0.0.9").node == "radius:net@127.0.0.9" and net.peer("127.0.0.9").name == "net"
    assert host.require_message_authenticator  # the default


def test_mapping_rejects_unknown_attribute_and_field() -> None:
    d = Dictionary(str(DICTIONARY))
    with pytest.raises(SettingsError, match="No-Such-Attr"):
        Mapping(d, {"No-Such-Attr": "account"})
    with pytest.raises(SettingsError, match="unknown field"):
        Mapping(d, {"User-Name": "accout"})


class _FakeService:
    """Answers every check with a deny; records what it was asked and by whom."""

    def __init__(self) -> None:
        self.info_providers: dict[str, Any] = {}
        self.seen: list[tuple[Any, Peer]] = []
        self.clock = ManualClock()
        self.store = EmbeddedStore()

    async def handle(self, req: Any, peer: Peer = LOCAL) -> dict[str, Any]:
        self.seen.append((req, peer))
        if req.op == "check":
            return {"ok": True, "decision": "deny", "code": 403, "reason": "Nope", "rule": "r"}
        return {"ok": True}

    def ended(self, rec: Any, reason: str, now: float) -> None:
        pass


async def test_one_socket_for_auth_and_acct_in_process() -> None:
    import asyncio

    from policy.settings import Settings
    from policy.transports.radius import start_radius

    port = free_port()
    s = Settings()
    s.radius_auth = s.radius_acct = f"127.0.0.1:{port}"
    s.radius_clients = [RadiusClient("127.0.0.1", SECRET, "reject", "lo")]
    svc = _FakeService()
    close, where = await start_radius(svc, s)  # type: ignore[arg-type]
    try:
        assert where == {"radius_auth": f"127.0.0.1:{port}", "radius_acct": f"127.0.0.1:{port}"}
        d = Dictionary(str(DICTIONARY))
        loop = asyncio.get_running_loop()
        auth = rp.AuthPacket(secret=SECRET.encode(), dict=d)
        auth["User-Name"] = "acme"
        auth["Acct-Session-Id"] = "ip-1"
        auth["Proxy-State"] = b"hop-1"
        auth.add_message_authenticator()
        acct = rp.AcctPacket(secret=SECRET.encode(), dict=d)
        acct["Acct-Session-Id"] = "ip-1"
        acct["Acct-Status-Type"] = 2
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.setblocking(False)
            sock.connect(("127.0.0.1", port))
            for pkt, code in ((auth, rp.AccessReject), (acct, rp.AccountingResponse)):
                raw = pkt.RequestPacket()
                await loop.sock_sendall(sock, raw)
                data = await asyncio.wait_for(loop.sock_recv(sock, 4096), 2)
                reply = pkt.CreateReply(packet=data)
                assert reply.code == code and pkt.VerifyReply(reply, data)
                if code == rp.AccessReject:
                    assert reply["Reply-Message"] == ["Nope"]
                    assert reply[33] == [b"hop-1"]  # Proxy-State copied
        assert [m.op for m, _peer in svc.seen] == ["check", "end"]
        check, peer = svc.seen[0]
        assert check.account == "acme" and svc.seen[1][0].reason == "bye"
        assert (peer.transport, peer.role, peer.name, peer.node) == ("radius", "proxy", "lo", "radius:lo")
        assert svc.info_providers["radius"]()["answered"] == 2
    finally:
        await close()


def test_radius_settings(tmp_path: Path) -> None:
    from policy.settings import load_settings

    cfg = tmp_path / "s.toml"
    cfg.write_text('[radius]\nauth = "127.0.0.1:1812"\nreplay_window = 60\nreplay_entries = 5000\n'
                   'clients = [{ address = "10.0.0.1", secret = "x" },\n'
                   '           { address = "10.0.0.2", secret = "y", require_message_authenticator = false }]\n')
    s = load_settings(cfg)
    assert [c.require_message_authenticator for c in s.radius_clients] == [True, False]
    assert (s.radius_replay_window, s.radius_replay_entries) == (60, 5000)
    for bad, key in (('clients = [{ address = "10.0.0.1", secret = "x", require_message_authenticator = "no" }]',
                      "require_message_authenticator"),
                     ("replay_window = 0", "replay_window"), ("replay_entries = 10", "replay_entries")):
        cfg.write_text(f"[radius]\n{bad}\n")
        with pytest.raises(SettingsError, match=key):
            load_settings(cfg)
