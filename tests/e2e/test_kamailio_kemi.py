"""The optional app_python3 client (`-A POLICY_KEMI`): the same config asks callpolicy with a
blocking call from the SIP worker instead of evapi. Needs kamailio-python3-modules."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.harness import CFG, Kamailio, Uas, run_uac, sip_invite, wait_profiles_zero
from tests.helpers import ServiceProcess, free_port

APP_PYTHON3 = Path("/usr/lib/x86_64-linux-gnu/kamailio/modules/app_python3.so")
SCRIPT = CFG.parent / "callpolicy_kemi.py"

pytestmark = [
    pytest.mark.kamailio,
    pytest.mark.skipif(not APP_PYTHON3.exists(), reason="app_python3 not installed "
                       "(apt-get install kamailio-python3-modules)"),
]


def kemi_kamailio(uas: Uas, service_port: int, *, fail_open: bool = False) -> Kamailio:
    return Kamailio(uas.port, fail_open=fail_open,
                    defines=["POLICY_KEMI", f'KEMI_SCRIPT="{SCRIPT}"'],
                    env={"CALLPOLICY_SERVER": f"127.0.0.1:{service_port}", "CALLPOLICY_TIMEOUT": "0.3"})


@pytest.fixture
def uas() -> Iterator[Uas]:
    u = Uas().start()
    yield u
    u.stop()


def test_kemi_config_passes_check() -> None:
    res = Kamailio(5080, defines=["POLICY_KEMI", f'KEMI_SCRIPT="{SCRIPT}"']).check()
    assert res.returncode == 0, res.stdout + res.stderr


def test_kemi_account_cap_and_release(uas: Uas) -> None:
    with ServiceProcess(extra=["--log-level", "debug"]) as svc, kemi_kamailio(uas, svc.port) as kam:
        r = run_uac(kam.sip_port, calls=10, rate=20, hold_ms=2000, from_user="acme", service="200",
                    timeout=30)
        assert r.first_recv(200) == 3, (r.counts, kam.log()[-3000:])
        assert r.recv(486) == 7, r.counts
        sizes = wait_profiles_zero(svc.port)
        assert not any(sizes.values()), sizes
        ends = [e["reason"] for e in svc.log_events() if e.get("event") == "call_end"]
        assert ends.count("bye") == 3


def test_kemi_fail_closed_and_open_without_service(uas: Uas) -> None:
    dead = free_port()
    with kemi_kamailio(uas, dead) as kam:
        code, secs = sip_invite(kam.sip_port)
        assert code == 503 and secs < 0.2, (code, secs)
    with kemi_kamailio(uas, dead, fail_open=True) as kam:
        r = run_uac(kam.sip_port, calls=2, rate=20, hold_ms=200, from_user="acme", service="200", timeout=20)
        assert r.first_recv(200) == 2, (r.counts, kam.log()[-3000:])
