"""sipp -> Kamailio (kamailio-radius.cfg: misc_radius check, acc_radius accounting) -> sipp,
with callpolicy's RADIUS front end deciding. Counts come from sipp's -trace_counts and from
the service's profile_size op."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from tests.e2e_radius.conftest import Kamailio, StackFactory, run_uac

pytestmark = pytest.mark.kamailio


def test_shipped_config_passes_kamailio_check() -> None:
    for fail_open in (False, True):
        res = Kamailio(5080, 1812, 1813, fail_open=fail_open).check()
        assert res.returncode == 0, res.stdout + res.stderr
        assert "config file ok" in res.stdout + res.stderr


def test_account_cap_holds_and_counts_return_to_zero(radius_stack: StackFactory) -> None:
    """20 calls of 2 s at 10 calls/s from acme (cap 3): 3 answered, 17 refused with 486;
    acc_radius Start/Stop leave every profile at 0."""
    st = radius_stack()
    assert st.svc is not None
    r = run_uac(st.kam.sip_port, calls=20, rate=10, hold_ms=2000, from_user="acme", timeout=40)
    assert r.first_recv(200) == 3, (r.counts, r.stderr, st.dump())
    assert r.recv(486) == 17, r.counts
    assert r.recv(503) == 0, r.counts
    assert r.counts.get("0_INVITE_Sent") == 20, r.counts
    sizes = st.svc.wait_zero()
    assert not any(sizes.values()), (sizes, st.dump())
    stats = st.svc.radius_stats()
    assert stats["acct_start"] == 3 and stats["acct_stop"] == 3, stats
    assert stats["access_accept"] == 3 and stats["access_accept_deny"] == 17, stats
    # radcli signed every Access-Request (the EAP-Message trigger): none was dropped for lack
    # of a Message-Authenticator, which this service requires (the default)
    assert stats["dropped"] == 0 and stats["dropped_no_message_authenticator"] == 0, stats
    rules = st.svc.call("stats")["rules"]
    assert rules["account-cap"]["deny"] == 17, rules


def test_refused_upstream_releases_via_failed(radius_stack: StackFactory) -> None:
    """The UAS refuses with 480: acc_radius reports Failed and the reserved slot is released."""
    st = radius_stack(uas="uas_reject.xml")
    assert st.svc is not None
    r = run_uac(st.kam.sip_port, calls=5, rate=10, hold_ms=500, from_user="acme", timeout=30)
    assert r.recv(480) == 5, (r.counts, st.dump())
    sizes = st.svc.wait_zero()
    assert not any(sizes.values()), (sizes, st.dump())
    stats = st.svc.radius_stats()
    assert stats["access_accept"] == 5 and stats["acct_failed"] == 5, stats


def test_reinvite_refreshes_the_lease(radius_stack: StackFactory) -> None:
    """A 200 to a re-INVITE makes acc_radius send Alive: callpolicy refreshes the call's lease."""
    st = radius_stack(uas="uas_reinvite.xml")
    assert st.svc is not None
    r = run_uac(st.kam.sip_port, scenario="uac_reinvite.xml", calls=3, rate=10, hold_ms=700,
                from_user="acme", timeout=30)
    assert r.counts.get("0_INVITE_Sent") == 3 and r.recv(200) == 9, (r.counts, r.stderr, st.dump())
    sizes = st.svc.wait_zero()
    assert not any(sizes.values()), (sizes, st.dump())
    stats = st.svc.radius_stats()
    assert stats["acct_start"] == 3 and stats["acct_interim"] == 3 and stats["acct_stop"] == 3, stats
    assert stats.get("acct_errors", 0) == 0, stats


def test_service_down_fails_closed(radius_stack: StackFactory) -> None:
    """Nobody on the RADIUS ports: after radcli's timeout the INVITE gets 503."""
    st = radius_stack(service=False)
    r = run_uac(st.kam.sip_port, calls=1, rate=1, hold_ms=100, from_user="acme", timeout=20)
    assert r.recv(503) == 1, (r.counts, st.dump())


def test_callee_hangup_releases_by_the_callers_from_tag(radius_stack: StackFactory) -> None:
    """Calls are held as (Call-ID, the caller's From-tag), through node radius:kamailio; when the
    callee hangs up, acc (detect_direction) reports the caller's From-tag in the Stop, so the
    Stop finds the call its check admitted."""
    st = radius_stack(uas="uas_bye.xml")
    assert st.svc is not None
    result: dict[str, Any] = {}
    runner = threading.Thread(target=lambda: result.update(r=run_uac(
        st.kam.sip_port, scenario="uac_callee_bye.xml", calls=3, rate=10, hold_ms=0, from_user="acme",
        timeout=30)))
    runner.start()
    try:
        calls: list[dict[str, Any]] = []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            calls = st.svc.call("profile_list", profile="account", value="acme")["calls"]
            if len(calls) == 3 and all(c["state"] == "active" for c in calls):
                break
            time.sleep(0.05)
        assert len(calls) == 3 and all(c["state"] == "active" for c in calls), (calls, st.dump())
        assert all(c["from_tag"] and c["node"] == "radius:kamailio" for c in calls), calls
    finally:
        runner.join(60)
    r = result["r"]
    assert r.recv("BYE") == 3, (r.counts, r.stderr, st.dump())
    sizes = st.svc.wait_zero()
    assert not any(sizes.values()), (sizes, st.dump())
    stats = st.svc.radius_stats()
    assert stats["acct_start"] == 3 and stats["acct_stop"] == 3 and stats.get("acct_errors", 0) == 0, stats
