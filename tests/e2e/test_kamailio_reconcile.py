"""End to end: calls counted exactly whatever is lost. A real Kamailio (shipped config), sipp and
`callpolicy serve`: the 407-challenged INVITE re-sent with the same identity, the service
stopped while a BYE passes, Kamailio restarted with calls up, a call relayed fail-open during
an outage, and Redis restarted empty (when the Redis store has its data-loss hook)."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.e2e.conftest import StackFactory
from tests.e2e.harness import (
    Kamailio,
    PyUas,
    SipCall,
    log_events,
    profile_size,
    run_uac,
    wait_for,
    wait_profiles_zero,
)
from tests.helpers import ROOT, LineClient, RedisServer

pytestmark = pytest.mark.kamailio

#: The reconcile interval and grace of the stacks here (the defaults are 60 s and 10 s).
INTERVAL = 2.0
GRACE = 1.0


def sample(port: int, profile: str, value: str | None, delay: float) -> tuple[threading.Thread, list[int]]:
    """Read one profile size after `delay` seconds, in a thread."""
    seen: list[int] = []

    def run() -> None:
        time.sleep(delay)
        seen.append(profile_size(port, profile, value))

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, seen


def wait_size(port: int, profile: str, value: str | None, want: int, timeout: float) -> float:
    """Wait until the profile holds `want` calls; return how long it took."""
    t0 = time.monotonic()

    def holds() -> bool:
        try:
            return profile_size(port, profile, value) == want
        except AssertionError:  # a store error (Redis answering late on a loaded machine): poll again
            return False

    wait_for(holds, timeout, f"{profile}={value} to hold {want} call(s)", interval=0.1)
    return time.monotonic() - t0


# -- identity: the 407 re-INVITE ------------------------------------------------------------------


def test_407_challenged_invite_resent_with_the_same_identity(make_stack: StackFactory) -> None:
    """The UAS challenges the INVITE (407); the caller re-sends it with the same Call-ID and
    From-tag (CSeq 2) and it is answered. The call counts once while up and 0 after the BYE:
    the `end` of the challenged attempt never releases the answered one, whichever arrives first."""
    st = make_stack(uas="uas_407.xml")
    sampler, seen = sample(st.port, "total", None, 0.8)
    r = run_uac(st.kam.sip_port, scenario="uac_407.xml", calls=1, rate=10, hold_ms=1500,
                from_user="bob", service="200", timeout=20)
    sampler.join()
    assert r.recv(407) == 1 and r.counts.get("8_200_Recv") == 1 and r.counts.get("12_200_Recv") == 1, \
        (r.counts, st.dump())
    assert seen == [1], "the call counts once while it is up"
    sizes = wait_profiles_zero(st.port)
    assert not any(sizes.values()), sizes
    assert st.svc is not None
    checks = log_events(st.svc, "decision")
    assert [(c["call_id"], c["from_tag"], c["decision"]) for c in checks] == [(checks[0]["call_id"],
                                                                              checks[0]["from_tag"], "allow")] * 2
    ends = [e["reason"] for e in log_events(st.svc, "call_end")]
    stale = log_events(st.svc, "end_ignored")
    # the challenged attempt's end either came first (released, then the re-INVITE counted
    # anew) or late (ignored as stale); the answered call is released by its BYE alone
    assert ends in (["failed", "bye"], ["bye"]), ends
    assert len(stale) == (1 if ends == ["bye"] else 0), stale
    assert st.kam.active_dialogs() == 0


def test_407_at_the_account_cap_minus_one(make_stack: StackFactory) -> None:
    """acme (cap 3) holds 2 calls; a challenged then re-sent acme call is answered, counts as
    the third while up, and the account is back to 2 after its BYE (then 0)."""
    st = make_stack(uas="uas_407.xml")
    with ThreadPoolExecutor(1) as pool:
        bg = pool.submit(run_uac, st.kam.sip_port, scenario="uac_407.xml", calls=2, rate=20,
                         hold_ms=5000, from_user="acme", service="200", timeout=30)
        wait_size(st.port, "account", "acme", 2, 10)
        sampler, seen = sample(st.port, "account", "acme", 0.8)
        r = run_uac(st.kam.sip_port, scenario="uac_407.xml", calls=1, rate=10, hold_ms=1500,
                    from_user="acme", service="300", timeout=20)
        sampler.join()
        after = profile_size(st.port, "account", "acme")
        held = bg.result()
    assert r.counts.get("8_200_Recv") == 1 and r.recv(486) == 0, (r.counts, st.dump())
    assert seen == [3], "two held + the challenged-then-answered call"
    assert after == 2, "its BYE released it, and only it"
    assert held.counts.get("8_200_Recv") == 2, held.counts
    sizes = wait_profiles_zero(st.port)
    assert not any(sizes.values()), sizes


def test_407_calls_at_10_per_second(make_stack: StackFactory) -> None:
    st = make_stack(uas="uas_407.xml")
    r = run_uac(st.kam.sip_port, scenario="uac_407.xml", calls=20, rate=10, hold_ms=200,
                from_user="bob", service="200", timeout=30)
    assert r.recv(407) == 20 and r.counts.get("8_200_Recv") == 20, (r.counts, st.dump())
    sizes = wait_profiles_zero(st.port)
    assert not any(sizes.values()), sizes
    assert st.svc is not None
    assert len(log_events(st.svc, "decision")) == 40
    assert [e["reason"] for e in log_events(st.svc, "call_end")].count("bye") == 20


# -- lost notices: repaired from Kamailio's own dialog list -----------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_service_stopped_while_a_bye_passes(make_stack: StackFactory, sig: int) -> None:
    """The service stops with a call up (SIGTERM writes the snapshot; with SIGKILL the periodic
    one has it), the BYE passes while nobody listens, the service comes back with the call
    restored from its snapshot: the reconciliation releases it within one interval."""
    st = make_stack(reconcile_interval=INTERVAL, grace=GRACE, snapshot_interval=0.3)
    svc = st.svc
    assert svc is not None
    with ThreadPoolExecutor(1) as pool:
        bg = pool.submit(run_uac, st.kam.sip_port, calls=1, rate=10, hold_ms=2500, from_user="bob",
                         service="200", timeout=20)
        wait_size(st.port, "total", None, 1, 5)
        time.sleep(1.0)  # the periodic snapshot (0.3 s) has the answered call
        svc.stop(sig)
        r = bg.result()
    assert r.counts.get("10_200_Recv") == 1, "the BYE passed"
    wait_for(lambda: st.kam.active_dialogs() == 0, 5, "Kamailio to end the dialog")
    svc.start()
    restored = log_events(svc, "snapshot_restored")
    assert restored and restored[-1]["calls"] == 1, restored
    took = wait_size(st.port, "total", None, 0, INTERVAL + 3)
    assert took < INTERVAL + 3
    released = log_events(svc, "reconciled_released")
    assert len(released) == 1 and released[0]["node"] == st.kam.evapi, released
    assert [e["reason"] for e in log_events(svc, "call_end")][-1] == "reconciled"


def test_kamailio_restarted_with_calls_up(make_stack: StackFactory) -> None:
    """3 acme calls up (cap 3), Kamailio restarts: their dialogs are gone and no BYE will ever
    send `end`. The service reconnects and releases them within one interval, and a new acme
    call is answered."""
    st = make_stack(reconcile_interval=INTERVAL, grace=GRACE)
    svc = st.svc
    assert svc is not None
    kam2: Kamailio | None = None
    try:
        with ThreadPoolExecutor(1) as pool:
            bg = pool.submit(run_uac, st.kam.sip_port, calls=3, rate=20, hold_ms=8000, from_user="acme",
                             service="200", timeout=30)
            wait_size(st.port, "account", "acme", 3, 5)
            st.kam.stop()
            kam2 = Kamailio(st.uas.port, sip_port=st.kam.sip_port, evapi_port=st.kam.evapi_port).start()
            kam2.wait_clients(1, timeout=10)
            took = wait_size(st.port, "account", "acme", 0, INTERVAL + 3)
            r = run_uac(kam2.sip_port, calls=1, rate=10, hold_ms=300, from_user="acme", service="201",
                        timeout=20)
            bg.result()
    finally:
        if kam2 is not None:
            kam2.stop()
    assert took < INTERVAL + 3
    assert r.first_recv(200) == 1 and r.recv(486) == 0, r.counts
    released = log_events(svc, "reconciled_released")
    assert len(released) == 3 and {e["account"] for e in released} == {"acme"}, released
    sizes = wait_profiles_zero(st.port)
    assert not any(sizes.values()), sizes


def test_call_relayed_fail_open_during_an_outage_is_counted(make_stack: StackFactory) -> None:
    """Fail-open: with the service down a call is relayed unchecked (its dialog still tracked,
    with the check's fields); when the service is back the call is counted, and its BYE
    releases it."""
    st = make_stack(fail_open=True, reconcile_interval=INTERVAL, grace=GRACE)
    svc = st.svc
    assert svc is not None
    svc.stop()
    wait_for(lambda: st.kam.clients() == 0, 5, "Kamailio to see the service go")
    with ThreadPoolExecutor(1) as pool:
        bg = pool.submit(run_uac, st.kam.sip_port, calls=1, rate=10, hold_ms=6000, from_user="acme",
                         service="200", timeout=20)
        wait_for(lambda: st.kam.active_dialogs() == 1, 5, "the call to be relayed")
        svc.start()
        st.kam.wait_clients(1)
        took = wait_size(st.port, "account", "acme", 1, INTERVAL + GRACE + 3)
        r = bg.result()
    assert r.first_recv(200) == 1, r.counts
    assert took < INTERVAL + GRACE + 3
    added = log_events(svc, "reconciled_added")
    assert len(added) == 1 and added[0]["account"] == "acme" and added[0]["state"] == "active", added
    assert added[0]["fields"] == "check"
    sizes = wait_profiles_zero(st.port)
    assert not any(sizes.values()), sizes
    assert [e["reason"] for e in log_events(svc, "call_end")] == ["bye"]


def test_reconcile_command_reports_the_node(make_stack: StackFactory) -> None:
    """`reconcile` (the CLI's op) on a live stack: nothing to repair, the node's counts reported."""
    st = make_stack()
    with ThreadPoolExecutor(1) as pool:
        bg = pool.submit(run_uac, st.kam.sip_port, calls=2, rate=20, hold_ms=2000, from_user="bob",
                         service="200", timeout=20)
        wait_size(st.port, "total", None, 2, 5)
        c = LineClient(port=st.port)
        try:
            r = c.call("reconcile", dry_run=True)
            stats = c.call("stats")
        finally:
            c.close()
        # the same through the CLI, as an operator runs it
        srv = f"127.0.0.1:{st.port}"
        out = cli("reconcile", "--dry-run", "--server", srv)
        one = cli("reconcile", "--dry-run", "--node", st.kam.evapi, "--server", srv)
        unknown = cli("reconcile", "--dry-run", "--node", "127.0.0.1:1", "--server", srv)
        bg.result()
    node = r["nodes"][st.kam.evapi]
    assert r["ok"] and (node["dialogs"], node["held"], node["released"], node["added"]) == (2, 2, 0, 0), r
    assert stats["reconcile"]["runs"] >= 1 and stats["reconcile"]["errors"] == 0, stats["reconcile"]
    line = f"{st.kam.evapi}: 2 dialogs on the node, 2 calls in the store; 0 would be released, 0 added"
    assert out.returncode == 0 and line in out.stdout, (out.stdout, out.stderr)
    assert one.returncode == 0 and line in one.stdout, (one.stdout, one.stderr)
    said = unknown.stdout + unknown.stderr
    assert unknown.returncode == 1 and "127.0.0.1:1" in said, said


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    """`callpolicy ARGS` (python -m policy) from the repository."""
    return subprocess.run([sys.executable, "-m", "policy", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=60, check=False)


# -- Redis restarted empty ---------------------------------------------------------------------


@pytest.mark.redis
def test_redis_restarted_empty_under_load(make_stack: StackFactory) -> None:
    """acme holds its cap (3) on Redis; Redis restarts empty while acme keeps calling: once the
    store has rebuilt itself from Kamailio's dialog list (logged), no acme call is admitted."""
    redis = RedisServer().start()
    try:
        st = make_stack(store=redis.url, reconcile_interval=INTERVAL, grace=0.5)
        svc = st.svc
        assert svc is not None
        with ThreadPoolExecutor(2) as pool:
            held = pool.submit(run_uac, st.kam.sip_port, calls=3, rate=20, hold_ms=12000, from_user="acme",
                               service="200", timeout=40)
            wait_size(st.port, "account", "acme", 3, 5)
            time.sleep(GRACE)
            port = redis.port
            redis.stop()
            redis = RedisServer(port=port).start()
            load = pool.submit(run_uac, st.kam.sip_port, calls=40, rate=10, hold_ms=500, from_user="acme",
                               service="300", timeout=40)
            wait_for(lambda: bool(log_events(svc, "reconcile_rebuild")), 10, "the store's rebuild")
            wait_size(st.port, "account", "acme", 3, INTERVAL + 3)  # rebuilt from Kamailio's dialogs
            answered_after: list[int] = []
            while not load.done():
                # a poll the loaded Redis answers too late (store_error) proves nothing either way
                with contextlib.suppress(AssertionError):
                    answered_after.append(profile_size(st.port, "account", "acme"))
                time.sleep(0.1)
            assert answered_after, "no size could be read while the load ran"
            load.result()
            held.result()
        assert max(answered_after) <= 3, answered_after
        assert len(log_events(svc, "reconciled_added")) >= 3
    finally:
        redis.stop()


def test_one_call_id_with_new_from_tags_is_several_calls(make_stack: StackFactory) -> None:
    """A phone reusing one Call-ID with new From-tags starts a new Kamailio dialog each time:
    each is a call of its own, so acme's cap (3) holds, and one BYE releases one call."""
    uas = PyUas().start()
    try:
        st = make_stack(uas_obj=uas)  # type: ignore[arg-type]
        calls = [SipCall(st.kam.sip_port, "reused-call-id@127.0.0.1", f"tag{i}") for i in range(5)]
        try:
            codes = [c.invite() for c in calls]
            assert codes == [200, 200, 200, 486, 486], (codes, st.dump())
            assert profile_size(st.port, "account", "acme") == 3
            assert st.kam.active_dialogs() == 3
            assert calls[0].bye() == 200
            wait_size(st.port, "account", "acme", 2, 3)
            time.sleep(0.3)
            assert profile_size(st.port, "account", "acme") == 2, "one BYE ends one call"
            assert [c.bye() for c in calls[1:3]] == [200, 200]
        finally:
            for c in calls:
                c.close()
        sizes = wait_profiles_zero(st.port)
        assert not any(sizes.values()), sizes
        assert uas.invites == 3 and uas.byes == 3
    finally:
        uas.stop()


def test_call_answered_while_the_service_was_down_becomes_active(make_stack: StackFactory) -> None:
    """The service stops while a checked call rings; the 200 passes while nobody listens (its
    `answer` is lost). Back up, the call is still early in the restored store — it would be
    released after early_timeout while up — until the reconciliation answers it."""
    st = make_stack(uas="uas_slow.xml", reconcile_interval=INTERVAL, grace=GRACE)
    svc = st.svc
    assert svc is not None
    with ThreadPoolExecutor(1) as pool:
        bg = pool.submit(run_uac, st.kam.sip_port, calls=1, rate=10, hold_ms=6000, from_user="bob",
                         service="200", timeout=30)
        wait_size(st.port, "total", None, 1, 5)
        svc.stop()  # SIGTERM: the snapshot holds the early call
        wait_for(lambda: "ongoing: 1" in st.kam.rpc("dlg.stats_active"), 5, "the call to be answered")
        svc.start()
        st.kam.wait_clients(1)

        def state() -> str:
            c = LineClient(port=st.port)
            try:
                calls = c.call("profile_list", profile="total")["calls"]
            finally:
                c.close()
            return str(calls[0]["state"]) if calls else ""

        wait_for(lambda: state() == "active", INTERVAL + 3, "the call to be active")
        r = bg.result()
    assert r.first_recv(200) == 1, r.counts
    answered = log_events(svc, "reconciled_answered")
    assert len(answered) == 1, answered
    sizes = wait_profiles_zero(st.port)
    assert not any(sizes.values()), sizes
