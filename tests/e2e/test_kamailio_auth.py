"""End to end: who may talk to Kamailio's evapi port. A real Kamailio with the shipped config:
only a client that proves it knows EVAPI_TOKEN gets checks and can resume an INVITE."""

from __future__ import annotations

import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.e2e.conftest import StackFactory
from tests.e2e.harness import (
    CFG,
    EvapiClient,
    Kamailio,
    SilentEvapiClient,
    log_events,
    service_config,
    sip_invite,
)
from tests.helpers import ServiceProcess

pytestmark = pytest.mark.kamailio


def test_rogue_client_gets_no_check_and_cannot_resume_an_invite(make_stack: StackFactory) -> None:
    """A local process connects to the evapi port first (so it holds the first slot), then
    callpolicy (here a mute, authenticated client). An INVITE's check goes to callpolicy only;
    the rogue, even handed the right tindex/tlabel, cannot resume it: the INVITE is refused
    (fail closed) after the policy timeout, never relayed."""
    st = make_stack(service=False, timeout_ms=1500)
    rogue = EvapiClient(st.kam.evapi, token=None)
    silent = SilentEvapiClient(st.kam.evapi)
    try:
        assert silent.authenticated and not rogue.authenticated
        st.kam.wait_clients(1)
        assert st.kam.clients() == 1, "the rogue does not count as a callpolicy client"
        with ThreadPoolExecutor(1) as pool:
            invite = pool.submit(sip_invite, st.kam.sip_port, from_user="acme", timeout=5)
            check = silent.read_until(lambda m: m.get("op") == "check", 3)
            assert check is not None and check["from_tag"] and check["account"] == "acme"
            assert rogue.read_until(lambda m: m.get("op") == "check", 0.3) is None
            # the forged answer names the right transaction
            rogue.send({"tindex": check["tindex"], "tlabel": check["tlabel"], "ok": True, "decision": "allow",
                        "token": "forged"})
            code, secs = invite.result()
        assert code == 503 and secs > 1.2, (code, secs, st.kam.log()[-3000:])
        assert [m.get("method") for m in rogue.received] == ["callpolicy.challenge"], rogue.received
        # nor may it read the dialog list
        rogue.send({"jsonrpc": "2.0", "method": "dlg.briefing", "params": ["cF"], "id": 7})
        assert rogue.read_until(lambda m: m.get("id") == 7, 0.5) is None
        log = st.kam.log()
        assert "ignored a message from unauthenticated client" in log
        assert "refused dlg.briefing from unauthenticated client" in log
    finally:
        rogue.close()
        silent.close()


def test_wrong_or_replayed_proof_is_refused(make_stack: StackFactory) -> None:
    st = make_stack(service=False)
    wrong = EvapiClient(st.kam.evapi, token="not-the-secret")
    good = SilentEvapiClient(st.kam.evapi)
    try:
        assert not wrong.authenticated and good.authenticated
        # replaying the good client's (valid) answer on another connection: its nonce was for that
        # connection's challenge only
        recorded = {"jsonrpc": "2.0", "method": "callpolicy.auth", "id": 5,
                    "params": {"proof": "0" * 64, "nonce": "n" * 32}}
        replay = EvapiClient(st.kam.evapi, token=None)
        try:
            from policy.transports.evapi import proof

            challenge = good.received[0]["params"]["nonce"]
            recorded["params"]["proof"] = proof(challenge, good_token(st.kam))  # type: ignore[index]
            replay.send(recorded)
            reply = replay.read_until(lambda m: m.get("id") == 5, 2)
            assert reply is not None and reply["error"]["code"] == 401, reply
            # one attempt per challenge: the right proof for its own nonce is now refused too
            own = replay.received[0]["params"]["nonce"]
            replay.send({**recorded, "id": 6, "params": {"proof": proof(own, good_token(st.kam)), "nonce": "m" * 32}})
            reply = replay.read_until(lambda m: m.get("id") == 6, 2)
            assert reply is not None and reply["error"]["code"] == 401, reply
        finally:
            replay.close()
        assert st.kam.clients() == 1
    finally:
        wrong.close()
        good.close()


def good_token(kam: Kamailio) -> str:
    assert kam.token is not None
    return kam.token


def test_service_with_the_wrong_secret_is_refused(make_stack: StackFactory) -> None:
    """callpolicy configured with another secret: Kamailio refuses it, calls fail closed at once,
    and the service says why (evapi_auth_failed), retrying with backoff."""
    st = make_stack(service=False)
    svc = ServiceProcess(extra=["--evapi", st.kam.evapi, "--log-level", "debug"])
    svc.config = service_config(svc.workdir, token="not-the-secret")
    with svc:
        deadline = time.monotonic() + 5
        while not log_events(svc, "evapi_auth_failed") and time.monotonic() < deadline:
            time.sleep(0.05)
        failed = log_events(svc, "evapi_auth_failed")
        assert failed and "authentication failed" in failed[0]["error"], svc.log()[-2000:]
        assert st.kam.clients() == 0
        code, secs = sip_invite(st.kam.sip_port)
        assert code == 503 and secs < 0.2, (code, secs)


def test_kamailio_without_a_token_refuses_everyone() -> None:
    """The shipped config with no EVAPI_TOKEN at all: nobody authenticates (secure default)."""
    kam = Kamailio(5080, token=None)
    res = kam.check()
    assert res.returncode == 0, res.stdout + res.stderr
    kam.start()
    try:
        client = EvapiClient(kam.evapi, token="")
        try:
            assert not client.authenticated
            assert kam.clients() == 0
        finally:
            client.close()
    finally:
        kam.stop()


def test_each_check_goes_to_one_authenticated_client(make_stack: StackFactory) -> None:
    """Two authenticated clients: each check (and the call's notices) goes to one of them, not both
    (evapi_async_unicast to the "callpolicy" tag), so two services never count one call twice."""
    st = make_stack(service=False, timeout_ms=300)
    a, b = SilentEvapiClient(st.kam.evapi), SilentEvapiClient(st.kam.evapi)
    try:
        st.kam.wait_clients(2)
        for _ in range(3):
            code, _secs = sip_invite(st.kam.sip_port)
            assert code == 503  # nobody answers
        a.read_until(lambda m: False, 0.3)
        b.read_until(lambda m: False, 0.3)
        got_a = [m for m in a.received if m.get("op") == "check"]
        got_b = [m for m in b.received if m.get("op") == "check"]
        assert len(got_a) + len(got_b) == 3 and not (got_a and got_b), (len(got_a), len(got_b))
    finally:
        a.close()
        b.close()


def test_token_file_next_to_the_config(tmp_path: Path) -> None:
    """The documented set-up: `callpolicy-evapi-token.cfg` beside kamailio.cfg (Kamailio started
    from elsewhere) defines EVAPI_TOKEN."""
    cfg = tmp_path / "kamailio.cfg"
    shutil.copy(CFG, cfg)
    (tmp_path / "callpolicy-evapi-token.cfg").write_text('#!define EVAPI_TOKEN "beside-the-config"\n')
    kam = Kamailio(5080, token=None, cfg=cfg)
    assert not (kam.dir / "callpolicy-evapi-token.cfg").exists()
    with kam:
        good = EvapiClient(kam.evapi, token="beside-the-config")
        try:
            assert good.authenticated and kam.clients() == 1
        finally:
            good.close()
