"""RADIUS hardening over real sockets: Message-Authenticator required, replays, Accounting-On/Off,
From-tag identity. A real `callpolicy serve` (SystemClock) with radclient and raw packets from
several loopback source addresses (127.0.0.1-3 are three NASes)."""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from policy.radius import packet as pk
from tests.test_radius import SECRET, Radius, needs_radclient

NAS_B = "127.0.0.2"  # opts out of require_message_authenticator
NAS_C = "127.0.0.3"


@pytest.fixture(scope="module")
def svc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Radius]:
    r = Radius(tmp_path_factory.mktemp("radius-sec"),
               [{"address": "127.0.0.1", "secret": SECRET, "style": "reject", "name": "nas-a"},
                {"address": NAS_B, "secret": SECRET, "style": "reject", "name": "nas-b",
                 "require_message_authenticator": False},
                {"address": NAS_C, "secret": SECRET, "style": "reject", "name": "nas-c"}],
               extra="[dialogs]\ndefault_timeout = 600\n").start()
    yield r
    r.stop()


def _attrs(**kw: Any) -> list[tuple[int, bytes]]:
    """Attributes by short name: user, session, from_tag, status, ts, delay, session_time."""
    codes = {"user": 1, "session": 44, "from_tag": 105, "status": 40, "ts": 55, "delay": 41,
             "session_time": 46, "calling": 31}
    out = []
    for k, v in kw.items():
        out.append((codes[k], struct.pack("!I", v) if isinstance(v, int) else v.encode()))
    return out


def send(data: bytes, port: int, src: str = "127.0.0.1", sock: socket.socket | None = None,
         timeout: float = 0.5) -> bytes | None:
    """Send from `src` (a new socket, i.e. a new source port, unless `sock`); the reply or None."""
    own = sock is None
    s = sock or socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        if own:
            s.bind((src, 0))
        s.settimeout(timeout)
        s.sendto(data, ("127.0.0.1", port))
        try:
            return s.recv(8192)
        except TimeoutError:
            return None
    finally:
        if own:
            s.close()


def access(call_id: str, user: str, ma: bool = True, secret: str = SECRET, **kw: Any) -> bytes:
    return pk.request(pk.ACCESS_REQUEST, 7, _attrs(user=user, session=call_id, **kw), secret.encode(),
                      message_authenticator=ma)


def acct(call_id: str, status: int, user: str = "acme", **kw: Any) -> bytes:
    return pk.request(pk.ACCOUNTING_REQUEST, 9, _attrs(status=status, user=user, session=call_id, **kw),
                      SECRET.encode())


def delta(before: dict[str, Any], after: dict[str, Any], key: str) -> int:
    if key in after.get("drop_reasons", {}) or key in before.get("drop_reasons", {}):
        return int(after["drop_reasons"].get(key, 0)) - int(before["drop_reasons"].get(key, 0))
    return int(after.get(key, 0)) - int(before.get(key, 0))


def dialogs(r: Radius) -> dict[str, int]:
    d: dict[str, int] = r.call("stats")["dialogs"]
    return d


# -- Message-Authenticator ------------------------------------------------------------------------


@needs_radclient
@pytest.mark.radius
def test_wrong_secret_without_message_authenticator_dropped_and_nothing_counted(svc: Radius) -> None:
    """The issue's attack: 12 Access-Requests with a wrong secret and no Message-Authenticator
    used to be accepted and fill a cap of 10. Now each is dropped, unanswered, and no counter moves."""
    before, dlg = svc.stats(), dialogs(svc)
    for i in range(12):
        rc, out = svc.radclient("auth", f'User-Name = "mallory", Acct-Session-Id = "blast-{i}"',
                                secret="not-the-secret", timeout=0.3)
        assert rc != 0 and "No reply" in out, out
    after = svc.stats()
    assert svc.size("mallory") == 0
    assert dialogs(svc)["early_dialogs"] == dlg["early_dialogs"]
    assert delta(before, after, "no_message_authenticator") == 12
    assert delta(before, after, "dropped_no_message_authenticator") == 12
    assert delta(before, after, "answered") == 0
    assert delta(before, after, "access_accept") == 0 and delta(before, after, "access_reject") == 0
    events = [e for e in svc.svc.log_events()
              if e.get("event") == "radius_dropped" and e.get("reason") == "no_message_authenticator"]
    assert events and events[0]["level"] == "warning" and events[0]["client"] == "nas-a"


@needs_radclient
@pytest.mark.radius
def test_right_secret_without_message_authenticator_dropped_by_default(svc: Radius) -> None:
    before = svc.stats()
    rc, out = svc.radclient("auth", 'User-Name = "acme", Acct-Session-Id = "noma-1"', timeout=0.3)
    assert rc != 0 and "No reply" in out, out
    assert svc.size("acme") == 0
    assert delta(before, svc.stats(), "dropped_no_message_authenticator") == 1
    # the same request signed is answered
    rc, out = svc.radclient("auth", 'User-Name = "acme", Acct-Session-Id = "noma-1", Message-Authenticator = 0x00')
    assert rc == 0 and "Received Access-Accept" in out, out
    assert svc.size("acme") == 1
    svc.call("end", call_id="noma-1")


def test_client_that_opts_out_is_answered_without_message_authenticator(svc: Radius) -> None:
    before = svc.stats()
    data = access("optout-1", "optout", ma=False)
    reply = send(data, svc.auth, src=NAS_B)
    assert reply is not None and reply[0] == pk.ACCESS_ACCEPT
    assert pk.reply_ok(data[4:20], reply, SECRET.encode())
    assert svc.size("optout") == 1
    # the same bytes from another NAS (which requires it) are dropped
    assert send(access("optout-2", "optout", ma=False), svc.auth, src=NAS_C) is None
    # what opting out costs: a wrong secret is not detected either (the NAS would discard the
    # answer, but the check was made) - docs/radius.md says so
    forged = access("optout-3", "optout", ma=False, secret="wrong")
    reply = send(forged, svc.auth, src=NAS_B)
    assert reply is not None and not pk.reply_ok(forged[4:20], reply, b"wrong")
    assert svc.size("optout") == 2
    assert delta(before, svc.stats(), "dropped_no_message_authenticator") == 1
    svc.call("end", call_id="optout-1")
    svc.call("end", call_id="optout-3")


@needs_radclient
@pytest.mark.radius
def test_opt_out_with_radclient(tmp_path: Path) -> None:
    r = Radius(tmp_path, [{"address": "127.0.0.1", "secret": SECRET, "name": "legacy",
                           "require_message_authenticator": False}]).start()
    try:
        rc, out = r.radclient("auth", 'User-Name = "acme", Acct-Session-Id = "legacy-1"')
        assert rc == 0 and "Received Access-Accept" in out, out
        assert r.size("acme") == 1
        assert any(e.get("event") == "radius_message_authenticator_not_required" and e.get("client") == "legacy"
                   for e in r.svc.log_events())
    finally:
        r.stop()


def test_replayed_access_request_from_another_port_dropped(svc: Radius) -> None:
    data = access("cap-1", "acme")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        first = send(data, svc.auth, sock=s)
        assert first is not None and first[0] == pk.ACCESS_ACCEPT
        # every Access-Request reply carries a Message-Authenticator as its first attribute (BlastRADIUS;
        # radcli >= 1.5 rejects replies where it is not first), and it verifies
        assert pk.parse(first).ma_offset == 22 and pk.reply_ok(data[4:20], first, SECRET.encode())
        assert send(data, svc.auth, sock=s) == first  # a retransmission: the same answer
    assert svc.size("acme") == 1
    svc.call("end", call_id="cap-1")
    before = svc.stats()
    assert send(data, svc.auth) is None  # the capture, replayed from another port after the call ended
    assert svc.size("acme") == 0
    assert delta(before, svc.stats(), "replayed_access_request") == 1


# -- accounting replays -------------------------------------------------------------------------------


def test_replayed_start_after_stop_from_another_port_ignored(svc: Radius) -> None:
    start = acct("rp-1", 1)
    stop = acct("rp-1", 2)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        assert send(start, svc.acct, sock=s) is not None
        assert svc.size("acme") == 1
        assert send(stop, svc.acct, sock=s) is not None
    assert svc.size("acme") == 0
    before = svc.stats()
    reply = send(start, svc.acct)  # another source port
    assert reply is not None and reply[0] == pk.ACCOUNTING_RESPONSE  # answered, so a NAS stops retrying
    assert svc.size("acme") == 0
    assert delta(before, svc.stats(), "replays") == 1
    assert delta(before, svc.stats(), "acct_start") == 0  # not applied at all


def test_start_after_stop_not_recreated_even_as_a_new_record(svc: Radius) -> None:
    """A Start that differs from the one applied (or arrives after its Stop, out of order) does
    not bring an ended call back."""
    now = int(time.time())
    assert send(acct("rp-2", 1, ts=now), svc.acct) is not None
    assert send(acct("rp-2", 2, ts=now + 1), svc.acct) is not None
    before = svc.stats()
    assert send(acct("rp-2", 1, ts=now + 2), svc.acct) is not None
    assert svc.size("acme") == 0
    assert delta(before, svc.stats(), "acct_start_after_end") == 1
    # out of order: the Stop first, then its Start
    assert send(acct("rp-3", 2, ts=now), svc.acct) is not None
    assert send(acct("rp-3", 1, ts=now - 5), svc.acct) is not None
    assert svc.size("acme") == 0


@needs_radclient
@pytest.mark.radius
def test_replayed_start_after_stop_with_radclient(svc: Radius) -> None:
    """radclient sends each record from a new socket: the same Start again is a replay."""
    assert svc.acct_status("rc-1", "Start")[0] == 0
    assert svc.size("acme") == 1
    assert svc.acct_status("rc-1", "Stop")[0] == 0
    assert svc.size("acme") == 0
    before = svc.stats()
    rc, out = svc.acct_status("rc-1", "Start")
    assert rc == 0 and "Received Accounting-Response" in out, out
    assert svc.size("acme") == 0
    assert delta(before, svc.stats(), "replays") == 1


def test_stale_event_timestamp_dropped_delayed_record_accepted(svc: Radius) -> None:
    now = int(time.time())
    before = svc.stats()
    assert send(acct("old-1", 1, ts=now - 3600), svc.acct) is None  # an hour-old capture
    assert send(acct("old-2", 1, ts=now + 3600), svc.acct) is None  # from the future
    assert svc.size("acme") == 0
    assert delta(before, svc.stats(), "stale_event_timestamp") == 2
    # a record the NAS held back for an hour says so in Acct-Delay-Time: fresh
    assert send(acct("old-3", 1, ts=now - 3600, delay=3600), svc.acct) is not None
    assert svc.size("acme") == 1
    assert send(acct("old-3", 2, ts=now), svc.acct) is not None
    assert svc.size("acme") == 0


def test_duplicate_interim_from_another_port_not_applied_twice(svc: Radius) -> None:
    now = int(time.time())
    assert send(acct("int-1", 1, ts=now), svc.acct) is not None
    interim = acct("int-1", 3, ts=now + 1, session_time=1)
    assert send(interim, svc.acct) is not None
    before = svc.stats()
    assert send(interim, svc.acct) is not None  # answered ...
    after = svc.stats()
    assert delta(before, after, "replays") == 1 and delta(before, after, "acct_interim") == 0  # ... not applied
    assert send(acct("int-1", 2, ts=now + 2), svc.acct) is not None
    assert svc.size("acme") == 0


# -- Accounting-On / Off ----------------------------------------------------------------------------


def test_accounting_on_releases_only_that_nas_calls(svc: Radius) -> None:
    for i in range(3):  # nas-b admits 3 calls by Access-Request
        reply = send(access(f"nb-{i}", "nas-b-acct"), svc.auth, src=NAS_B)
        assert reply is not None and reply[0] == pk.ACCESS_ACCEPT
    assert send(acct("nb-acct", 1, user="nas-b-acct"), svc.acct, src=NAS_B) is not None  # and one by Start
    for i in range(2):
        assert send(access(f"nc-{i}", "nas-c-acct"), svc.auth, src=NAS_C) is not None
    assert svc.size("nas-b-acct") == 4 and svc.size("nas-c-acct") == 2
    calls = svc.call("profile_list", profile="account", value="nas-b-acct")["calls"]
    assert {c["node"] for c in calls} == {"radius:nas-b"}
    before = svc.stats()
    on = pk.request(pk.ACCOUNTING_REQUEST, 1, _attrs(status=7, ts=int(time.time())), SECRET.encode())
    reply = send(on, svc.acct, src=NAS_B)
    assert reply is not None and reply[0] == pk.ACCOUNTING_RESPONSE
    assert svc.size("nas-b-acct") == 0
    assert svc.size("nas-c-acct") == 2  # another NAS's calls stay
    assert delta(before, svc.stats(), "released_on_off") == 4
    assert any(e.get("event") == "radius_nas_accounting_on" and e.get("released") == 4
               and e.get("node") == "radius:nas-b" for e in svc.svc.log_events())
    off = pk.request(pk.ACCOUNTING_REQUEST, 2, _attrs(status=8, ts=int(time.time())), SECRET.encode())
    assert send(off, svc.acct, src=NAS_C) is not None
    assert svc.size("nas-c-acct") == 0


@needs_radclient
@pytest.mark.radius
def test_accounting_on_with_radclient(svc: Radius) -> None:
    svc.check("rc-on-1", account="rc-on")
    svc.check("rc-on-2", account="rc-on")
    keep = send(access("rc-on-other", "rc-on"), svc.auth, src=NAS_C)
    assert keep is not None and svc.size("rc-on") == 3
    rc, out = svc.radclient("acct", "Acct-Status-Type = Accounting-On")
    assert rc == 0 and "Received Accounting-Response" in out, out
    assert svc.size("rc-on") == 1
    svc.call("end", call_id="rc-on-other")


# -- identity -------------------------------------------------------------------------------------------


@needs_radclient
@pytest.mark.radius
def test_from_tag_identity(svc: Radius) -> None:
    """Two calls sharing a Call-ID with different From-tags are two calls; each Stop ends its own."""
    for tag in ("ft-1", "ft-2"):
        rc, out = svc.check("shared-cid", account="tags", Sip_From_Tag=tag)
        assert rc == 0 and "Received Access-Accept" in out, out
    assert svc.size("tags") == 2
    calls = svc.call("profile_list", profile="account", value="tags")["calls"]
    assert sorted(c["from_tag"] for c in calls) == ["ft-1", "ft-2"]
    assert svc.acct_status("shared-cid", "Start", account="tags", extra=', Sip-From-Tag = "ft-1"')[0] == 0
    assert svc.size("tags") == 2  # answered the held call, not a third
    assert svc.acct_status("shared-cid", "Stop", account="tags", extra=', Sip-From-Tag = "ft-1"')[0] == 0
    calls = svc.call("profile_list", profile="account", value="tags")["calls"]
    assert [c["from_tag"] for c in calls] == ["ft-2"]
    # a Stop without the From-tag names another call (Call-ID alone): nothing released
    assert svc.acct_status("shared-cid", "Stop", account="tags")[0] == 0
    assert svc.size("tags") == 1
    assert svc.acct_status("shared-cid", "Stop", account="tags", extra=', Sip-From-Tag = "ft-2"')[0] == 0
    assert svc.size("tags") == 0
