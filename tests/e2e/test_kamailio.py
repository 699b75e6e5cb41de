"""End to end: sipp UAC -> Kamailio (shipped kamailio.cfg) -> sipp UAS, with a real
`callpolicy serve` connected over evapi. Counts come from sipp's -trace_counts and from the
service's profile_size op."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.e2e.conftest import StackFactory
from tests.e2e.harness import (
    Kamailio,
    SilentEvapiClient,
    evapi_info,
    profile_size,
    run_uac,
    sip_invite,
    wait_profiles_zero,
)
from tests.helpers import LineClient, ServiceProcess

pytestmark = pytest.mark.kamailio


def stats(port: int) -> dict[str, object]:
    c = LineClient(port=port)
    try:
        return c.call("stats")
    finally:
        c.close()


def end_reasons(svc: ServiceProcess) -> list[str]:
    return [e["reason"] for e in svc.log_events() if e.get("event") == "call_end"]


def test_shipped_config_passes_kamailio_check() -> None:
    for fail_open, defines in ((False, []), (True, []), (False, ["POLICY_OFF"])):
        res = Kamailio(5080, fail_open=fail_open, defines=defines).check()
        assert res.returncode == 0, res.stdout + res.stderr
        assert "config file ok" in res.stdout + res.stderr


def test_account_cap(make_stack: StackFactory) -> None:
    """30 calls of 3 s at 10 calls/s from acme (cap 3): 3 answered, 27 refused with 486."""
    st = make_stack()
    r = run_uac(st.kam.sip_port, calls=30, rate=10, hold_ms=3000, from_user="acme", service="200",
                timeout=40)
    assert r.first_recv(200) == 3, (r.counts, st.dump())
    assert r.recv(486) == 27, r.counts
    assert r.recv(503) == 0 and r.recv(603) == 0, r.counts
    assert r.counts.get("0_INVITE_Sent") == 30
    sizes = wait_profiles_zero(st.port)
    assert not any(sizes.values()), sizes
    rules = stats(st.port)["rules"]
    assert rules["account-cap"]["deny"] == 27, rules  # type: ignore[index]
    assert st.kam.active_dialogs() == 0, st.kam.rpc("dlg.stats_active")


def test_emergency_overflow(make_stack: StackFactory) -> None:
    """acme at its cap; 12 concurrent calls to 112: 5 answered, 7 get 503, none by the account cap."""
    st = make_stack()
    with ThreadPoolExecutor(1) as pool:
        background = pool.submit(run_uac, st.kam.sip_port, calls=3, rate=20, hold_ms=8000,
                                 from_user="acme", service="200", timeout=30)
        deadline = time.monotonic() + 5
        while profile_size(st.port, "account", "acme") < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert profile_size(st.port, "account", "acme") == 3, st.dump()
        r = run_uac(st.kam.sip_port, calls=12, rate=100, hold_ms=3000, from_user="acme", service="112",
                    timeout=30)
        bg = background.result()
    assert bg.first_recv(200) == 3, bg.counts
    assert r.first_recv(200) == 5, (r.counts, st.dump())
    assert r.recv(503) == 7, r.counts
    assert r.recv(486) == 0, r.counts
    rules = stats(st.port)["rules"]
    assert rules["emergency"] == {"allow": 5, "deny": 7}, rules  # type: ignore[index]
    assert rules.get("account-cap", {}).get("deny", 0) == 0, rules  # type: ignore[attr-defined]
    sizes = wait_profiles_zero(st.port)
    assert not any(sizes.values()), sizes


def _during(port: int, delay: float) -> tuple[threading.Thread, list[int]]:
    """Sample the `total` profile after `delay` seconds, in a thread."""
    seen: list[int] = []

    def sample() -> None:
        time.sleep(delay)
        seen.append(profile_size(port, "total"))

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    return t, seen


def test_release_after_bye(make_stack: StackFactory) -> None:
    st = make_stack()
    sampler, seen = _during(st.port, 0.8)
    r = run_uac(st.kam.sip_port, calls=2, rate=50, hold_ms=1500, from_user="bob", service="200",
                timeout=20)
    sampler.join()
    assert r.first_recv(200) == 2 and r.counts.get("10_200_Recv") == 2, r.counts
    assert seen == [2], "both calls are counted while they last"
    sizes = wait_profiles_zero(st.port)
    assert not any(sizes.values()), sizes
    assert end_reasons(st.svc) == ["bye", "bye"]  # type: ignore[arg-type]


def test_release_after_cancel(make_stack: StackFactory) -> None:
    st = make_stack(uas="uas_ring.xml")
    sampler, seen = _during(st.port, 0.6)
    r = run_uac(st.kam.sip_port, scenario="uac_cancel.xml", calls=1, rate=10, hold_ms=1200,
                from_user="carol", service="200", timeout=20)
    sampler.join()
    assert r.recv(180) == 1 and r.recv(487) == 1, (r.counts, st.dump())
    assert seen == [1], "the ringing call is counted"
    sizes = wait_profiles_zero(st.port)
    assert not any(sizes.values()), sizes
    assert native_size(st.kam, "callpolicy") == 0  # Kamailio's own count agrees
    assert end_reasons(st.svc) == ["cancel"], st.dump()  # type: ignore[arg-type]


@pytest.mark.parametrize("code", [486, 603])
def test_release_after_uas_reject(make_stack: StackFactory, code: int) -> None:
    st = make_stack(uas="uas_reject.xml", uas_subst={"code": str(code)})
    r = run_uac(st.kam.sip_port, calls=3, rate=20, hold_ms=100, from_user="dave", service="200",
                timeout=20)
    assert r.recv(code) == 3, (r.counts, st.dump())
    sizes = wait_profiles_zero(st.port)
    assert not any(sizes.values()), sizes
    assert end_reasons(st.svc) == ["failed"] * 3  # type: ignore[arg-type]
    assert native_size(st.kam, "callpolicy") == 0  # Kamailio's own count agrees
    # the capacity is really back: the account can still place calls
    assert stats(st.port)["rules"]["account-cap"] == {"allow": 3}  # type: ignore[index]


def test_fail_closed_when_no_service(make_stack: StackFactory) -> None:
    st = make_stack(service=False)
    for _ in range(3):
        code, secs = sip_invite(st.kam.sip_port)
        assert code == 503, st.dump()
        assert secs < 0.2, f"503 took {secs:.3f} s"


def test_fail_closed_when_service_is_silent(make_stack: StackFactory) -> None:
    """Connected but never answering: 503 after POLICY_TIMEOUT_MS, not after tm's 30 s."""
    st = make_stack(service=False, timeout_ms=300)
    silent = SilentEvapiClient(st.kam.evapi)
    try:
        st.kam.wait_clients(1)
        code, secs = sip_invite(st.kam.sip_port)
    finally:
        silent.close()
    assert code == 503, st.dump()
    assert 0.25 < secs < 0.9, f"503 took {secs:.3f} s"


def test_fail_closed_after_service_stops(make_stack: StackFactory) -> None:
    st = make_stack()
    assert st.svc is not None
    assert sip_invite(st.kam.sip_port, from_user="erin")[0] == 200
    st.svc.stop()
    deadline = time.monotonic() + 5
    while st.kam.clients() and time.monotonic() < deadline:
        time.sleep(0.05)
    code, secs = sip_invite(st.kam.sip_port, from_user="erin")
    assert code == 503 and secs < 0.2, (code, secs)


def test_fail_open_relays(make_stack: StackFactory) -> None:
    st = make_stack(service=False, fail_open=True, timeout_ms=300)
    r = run_uac(st.kam.sip_port, calls=3, rate=20, hold_ms=200, from_user="acme", service="200", timeout=20)
    assert r.first_recv(200) == 3 and r.counts.get("10_200_Recv") == 3, (r.counts, st.kam.log()[-3000:])
    # a connected but silent service: relayed after the policy timeout
    silent = SilentEvapiClient(st.kam.evapi)
    try:
        st.kam.wait_clients(1)
        r = run_uac(st.kam.sip_port, calls=2, rate=20, hold_ms=200, from_user="acme", service="200",
                    timeout=20)
    finally:
        silent.close()
    assert r.first_recv(200) == 2 and r.recv(503) == 0, (r.counts, st.kam.log()[-3000:])


def test_service_reconnects_after_kamailio_restart(make_stack: StackFactory) -> None:
    st = make_stack()
    assert st.svc is not None
    st.kam.stop()
    deadline = time.monotonic() + 5
    while evapi_info(st.port)["connected"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert evapi_info(st.port)["connected"] == 0
    kam2 = Kamailio(st.uas.port, sip_port=st.kam.sip_port, evapi_port=st.kam.evapi_port).start()
    try:
        kam2.wait_clients(1, timeout=10)
        info = evapi_info(st.port)
        node = info["nodes"][kam2.evapi]
        assert info["connected"] == 1 and node["connects"] == 2, info
        r = run_uac(kam2.sip_port, calls=5, rate=50, hold_ms=500, from_user="acme", service="200",
                    timeout=20)
        assert r.first_recv(200) == 3 and r.recv(486) == 2, r.counts
    finally:
        kam2.stop()
    events = [e["event"] for e in st.svc.log_events() if str(e.get("event", "")).startswith("evapi_")]
    assert events[:3] == ["evapi_connected", "evapi_disconnected", "evapi_connected"] or \
        events.count("evapi_connected") == 2, events


def test_cancel_while_the_check_is_pending(make_stack: StackFactory) -> None:
    """A CANCEL for an INVITE still waiting on callpolicy ends it at once with 487."""
    import socket

    st = make_stack(service=False, timeout_ms=2000)
    silent = SilentEvapiClient(st.kam.evapi)
    try:
        st.kam.wait_clients(1)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as so:
            so.bind(("127.0.0.1", 0))
            so.settimeout(2)
            lp = so.getsockname()[1]
            ruri = f"sip:100@127.0.0.1:{st.kam.sip_port}"
            common = (f"Via: SIP/2.0/UDP 127.0.0.1:{lp};branch=z9hG4bKcx{lp}\r\n"
                      f"From: <sip:x@127.0.0.1>;tag=1\r\nTo: <{ruri}>\r\nCall-ID: cancel-{lp}\r\n"
                      "Max-Forwards: 70\r\nContent-Length: 0\r\n")
            so.sendto(f"INVITE {ruri} SIP/2.0\r\n{common}CSeq: 1 INVITE\r\n"
                      f"Contact: <sip:x@127.0.0.1:{lp}>\r\n\r\n".encode(), ("127.0.0.1", st.kam.sip_port))
            time.sleep(0.2)
            t0 = time.monotonic()
            so.sendto(f"CANCEL {ruri} SIP/2.0\r\n{common}CSeq: 1 CANCEL\r\n\r\n".encode(),
                      ("127.0.0.1", st.kam.sip_port))
            got = set()
            while {"487 INVITE", "200 CANCEL"} - got and time.monotonic() - t0 < 1.5:
                lines = so.recv(65535).decode().split("\r\n")
                cseq = next(x for x in lines if x.startswith("CSeq:")).split()[-1]
                got.add(f"{lines[0].split()[1]} {cseq}")
            elapsed = time.monotonic() - t0
            tag = next((x for x in lines if x.startswith("To:")), f"To: <{ruri}>")
            so.sendto(f"ACK {ruri} SIP/2.0\r\n{common.replace(f'To: <{ruri}>', tag)}CSeq: 1 ACK\r\n\r\n"
                      .encode(), ("127.0.0.1", st.kam.sip_port))
    finally:
        silent.close()
    assert {"487 INVITE", "200 CANCEL"} <= got, (got, st.dump())
    assert elapsed < 0.5, "not after the policy timeout"
    assert st.kam.active_dialogs() == 0


def native_size(kam: Kamailio, profile: str, value: str | None = None) -> int:
    """Kamailio's own count: `kamcmd dlg.profile_get_size PROFILE [VALUE]`."""
    out = kam.rpc("dlg.profile_get_size", profile, *([value] if value is not None else []))
    if out.strip().isdigit():  # kamcmd prints the bare number
        return int(out)
    for line in out.splitlines():
        key, _, v = line.strip().partition(":")
        if key.strip() == "count":
            return int(v.strip())
    raise AssertionError(f"no count in dlg.profile_get_size {profile}: {out!r}")


def test_kamailios_native_profiles_agree(make_stack: StackFactory) -> None:
    """The shipped config also counts what callpolicy admitted in Kamailio's own dialog
    profiles (`callpolicy`, `callpolicy_account`): while calls are held, refused, cancelled and
    ended, Kamailio's counts and callpolicy's are the same, and both return to 0."""
    st = make_stack()
    kam = st.kam
    assert native_size(kam, "callpolicy") == 0
    with ThreadPoolExecutor(3) as pool:
        acme = pool.submit(run_uac, kam.sip_port, calls=3, rate=20, hold_ms=6000, from_user="acme",
                           service="200", timeout=40)
        bob = pool.submit(run_uac, kam.sip_port, calls=2, rate=20, hold_ms=6000, from_user="bob",
                          service="200", timeout=40)
        deadline = time.monotonic() + 5
        while profile_size(st.port, "total") < 5 and time.monotonic() < deadline:
            time.sleep(0.05)
        # acme is at its cap (3): more calls are refused and join neither count
        refused = run_uac(kam.sip_port, calls=4, rate=50, hold_ms=1000, from_user="acme", service="200",
                          timeout=30)
        held = {"total": profile_size(st.port, "total"), "acme": profile_size(st.port, "account", "acme"),
                "bob": profile_size(st.port, "account", "bob")}
        native = {"total": native_size(kam, "callpolicy"), "acme": native_size(kam, "callpolicy_account", "acme"),
                  "bob": native_size(kam, "callpolicy_account", "bob")}
        assert held == {"total": 5, "acme": 3, "bob": 2}, st.dump()
        assert native == held
        assert acme.result().first_recv(200) == 3 and bob.result().first_recv(200) == 2
    assert refused.recv(486) == 4, refused.counts
    sizes = wait_profiles_zero(st.port)
    assert not any(sizes.values()), sizes
    assert native_size(kam, "callpolicy") == 0
    assert native_size(kam, "callpolicy_account", "acme") == 0
    assert native_size(kam, "callpolicy_account", "bob") == 0
