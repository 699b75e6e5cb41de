"""End to end: `callpolicy terminate` cuts calls in the Kamailio that holds them (shipped config,
real Kamailio, real UAs) and the counts drop with Kamailio's own end notices.

An answered call: `dlg.terminate_dlg` - both UAs get a BYE, the `dialog:end` notice (reason
"admin") releases the counts (or, in the run in ~20 where Kamailio 5.6.3 skips that notice
because a 200 for its BYE came back first, the service's own release after the RPC, logged
`terminate_released`: either way the count is 0 when `terminate` answers).
A ringing call: `tm.cancel` - the callee gets a CANCEL, the caller a 487, the `dialog:failed`
notice releases the counts. (Kamailio 5.6 sends no BYE for an early dialog: `dlg.terminate_dlg`
/ `dlg.end_dlg` on one log "terminating non-confirmed dialogs not supported", still run
`dialog:failed` and leave the call ringing - a call up but not counted; that is why early
dialogs are cancelled.)"""

from __future__ import annotations

import re
import subprocess
import sys
import time
import uuid

import pytest

from tests.e2e.conftest import StackFactory
from tests.e2e.harness import PyUas, SipCall, _header, _headers, log_events, profile_size, wait_for
from tests.helpers import ROOT

pytestmark = pytest.mark.kamailio


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "policy", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=60, check=False)


def answer_bye(call: SipCall, timeout: float = 5.0) -> bool:
    """Wait for a BYE on the caller's socket and answer it 200 OK; whether one came."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        call.sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            data, addr = call.sock.recvfrom(65535)
        except TimeoutError:
            return False
        msg = data.decode(errors="replace")
        if not msg.startswith("BYE "):
            continue
        ok = ["SIP/2.0 200 OK", *[f"Via: {v}" for v in _headers(msg, "Via")], f"From: {_header(msg, 'From')}",
              f"To: {_header(msg, 'To')}", f"Call-ID: {_header(msg, 'Call-ID')}", f"CSeq: {_header(msg, 'CSeq')}",
              "Content-Length: 0", "", ""]
        call.sock.sendto("\r\n".join(ok).encode(), addr)
        return True
    return False


def test_terminate_answered_calls_both_sides_get_a_bye(make_stack: StackFactory) -> None:
    """`terminate CALL-ID` (no From-tag: the node finds the dialog) and `terminate --profile account
    acme --yes`: each answered call gets a BYE on both sides, the counts drop to 0 through the
    `dialog:end` notices (reason admin), and a call of another account stays up."""
    uas = PyUas().start()
    calls: list[SipCall] = []
    try:
        st = make_stack(uas_obj=uas)  # type: ignore[arg-type]
        srv = f"127.0.0.1:{st.port}"
        calls = [SipCall(st.kam.sip_port, f"term-{i}-{uuid.uuid4().hex[:8]}@127.0.0.1", f"ft{i}") for i in range(2)]
        bob = SipCall(st.kam.sip_port, f"bob-{uuid.uuid4().hex[:8]}@127.0.0.1", "fbob", from_user="bob")
        calls.append(bob)
        assert [c.invite() for c in calls] == [200, 200, 200], st.dump()
        assert profile_size(st.port, "account", "acme") == 2 and profile_size(st.port, "account", "bob") == 1
        wait_for(lambda: profile_size(st.port, "total") == 3 and st.kam.active_dialogs() == 3, 5, "3 calls up")

        top = cli("top", "--once", "--server", srv)
        assert top.returncode == 0 and re.search(r"account\s+acme\s+2/3", top.stdout), top.stdout + top.stderr
        assert re.search(rf"node {re.escape(st.kam.evapi)}\s+connected", top.stdout), top.stdout
        assert re.search(r"reconcile\s+\d+ runs, 0 released, 0 added, 0 errors", top.stdout), top.stdout

        r = cli("terminate", calls[0].call_id, "--server", srv)
        assert r.returncode == 0, r.stdout + r.stderr + st.dump()
        assert f"{calls[0].call_id} from-tag ft0 (active): BYE sent to both sides, counts released" in r.stdout, \
            r.stdout + st.dump()
        assert answer_bye(calls[0]), "the caller got no BYE"
        wait_for(lambda: uas.byes == 1, 5, "the callee's BYE")
        assert profile_size(st.port, "account", "acme") == 1
        wait_for(lambda: st.kam.active_dialogs() == 2, 5, "Kamailio to drop the dialog")

        r = cli("terminate", "--profile", "account", "acme", "--yes", "--server", srv)
        assert r.returncode == 0, r.stdout + r.stderr + st.dump()
        assert "account=acme: 1 call(s): 1 ended in their proxy, 1 released, 0 error(s), 0 skipped" in r.stdout
        assert answer_bye(calls[1]), "the caller got no BYE"
        wait_for(lambda: uas.byes == 2, 5, "the callee's BYE")
        assert profile_size(st.port, "account", "acme") == 0
        assert profile_size(st.port, "account", "bob") == 1, "another account's call is untouched"
        assert st.svc is not None
        ends = {(e["call_id"], e["reason"]) for e in log_events(st.svc, "call_end")}
        assert {(calls[0].call_id, "admin"), (calls[1].call_id, "admin")} <= ends
        [one] = log_events(st.svc, "call_terminate")
        assert (one["call_id"], one["terminated"], one["released"]) == (calls[0].call_id, 1, 1)
        [key] = log_events(st.svc, "profile_terminate")
        assert (key["profile"], key["value"], key["calls"], key["terminated"]) == ("account", "acme", 1, 1)
        assert {e["action"] for e in log_events(st.svc, "evapi_dialog_end")} == {"bye"}
        assert bob.bye() == 200
        wait_for(lambda: profile_size(st.port, "total") == 0 and st.kam.active_dialogs() == 0, 5, "all calls over")
        # a caller's own BYE is still reason bye: the "admin" flag lives only around the RPC
        assert (bob.call_id, "bye") in {(e["call_id"], e["reason"]) for e in log_events(st.svc, "call_end")}

        r = cli("terminate", "no-such-call@127.0.0.1", "--server", srv)
        assert r.returncode == 1 and "no dialog no-such-call@127.0.0.1 ended: no node has it" in r.stdout
    finally:
        for c in calls:
            c.close()
        uas.stop()


def test_terminate_a_ringing_call_cancels_it(make_stack: StackFactory) -> None:
    """A call still ringing: the callee gets a CANCEL, the caller a 487; the counts drop through
    the `dialog:failed` notice; Kamailio keeps no dialog."""
    st = make_stack(uas="uas_ring.xml")
    call = SipCall(st.kam.sip_port, f"ring-{uuid.uuid4().hex[:8]}@127.0.0.1", "fring")
    try:
        branch = f"z9hG4bK{uuid.uuid4().hex[:16]}"
        call._send("INVITE", call.ruri, branch, 1)
        call.sock.settimeout(5)
        while " 180 " not in call.sock.recv(65535).decode(errors="replace").split("\r\n", 1)[0]:
            pass
        assert profile_size(st.port, "account", "acme") == 1
        r = cli("terminate", call.call_id, "--from-tag", "fring", "--server", f"127.0.0.1:{st.port}")
        assert r.returncode == 0, r.stdout + r.stderr + st.dump()
        assert "(early): CANCEL sent (the caller gets 487), counts released" in r.stdout, r.stdout
        final = ""
        deadline = time.monotonic() + 5
        while not final.startswith("SIP/2.0 487") and time.monotonic() < deadline:
            final = call.sock.recv(65535).decode(errors="replace")
        assert final.startswith("SIP/2.0 487"), final
        call.to = _header(final, "To")
        call._send("ACK", call.ruri, branch, 1)
        assert profile_size(st.port, "account", "acme") == 0
        assert st.svc is not None
        assert (call.call_id, "cancel") in {(e["call_id"], e["reason"]) for e in log_events(st.svc, "call_end")}
        wait_for(lambda: st.kam.active_dialogs() == 0, 5, "Kamailio to drop the dialog")
    finally:
        call.close()
