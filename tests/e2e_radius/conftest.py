"""End to end through Kamailio's misc_radius / acc_radius: sipp UAC -> Kamailio
(integrations/kamailio/kamailio-radius.cfg) -> sipp UAS, with a real `callpolicy serve` whose
`[radius]` front end Kamailio talks to through radcli. Everything on 127.0.0.1, every process
stopped at the end of the test.

The Kamailio/sipp machinery is tests/e2e/harness.py; only the RADIUS pieces live here."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.e2e import harness
from tests.e2e.harness import HOST, Uas, profile_size, profile_sizes, wait_profiles_zero
from tests.helpers import ROOT, RULES, LineClient, ServiceProcess, free_port

CFG = ROOT / "integrations" / "kamailio" / "kamailio-radius.cfg"
RADCLI_DICT = ROOT / "integrations" / "kamailio" / "radius" / "dictionary"
SCENARIOS = Path(__file__).resolve().parent / "scenarios"
SECRET = "e2e-secret"

#: The harness's sipp UAC, with this directory's scenarios and service 200.
run_uac = functools.partial(harness.run_uac, scenarios=SCENARIOS, service="200")


def missing_tools() -> str | None:
    """Why these tests cannot run here, or None."""
    why = harness.missing_tools()
    if why:
        return why
    mods = [Path("/usr/lib/x86_64-linux-gnu/kamailio/modules"), Path("/usr/lib/kamailio/modules"),
            Path("/usr/lib64/kamailio/modules"), Path("/usr/local/lib64/kamailio/modules")]
    if not any((m / "misc_radius.so").exists() for m in mods):
        return "kamailio-radius-modules is not installed (misc_radius.so not found)"
    return None


MISSING = missing_tools()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Skip the `kamailio` tests here when kamailio/sipp/the RADIUS modules are missing."""
    if not MISSING:
        return
    for item in items:
        if item.get_closest_marker("kamailio") is not None and "e2e_radius" in str(item.fspath):
            item.add_marker(pytest.mark.skip(reason=MISSING))


class RadiusService:
    """`callpolicy serve` with a [radius] table; Kamailio (127.0.0.1) is an `avp` client."""

    def __init__(self, workdir: Path) -> None:
        self.dir = workdir
        self.auth = free_port()
        self.acct = free_port()
        cfg = workdir / "service.toml"
        cfg.write_text(
            f'[rules]\ndir = "{RULES}"\nwatch = false\n\n'
            f'[radius]\nauth = "{HOST}:{self.auth}"\nacct = "{HOST}:{self.acct}"\n'
            f'clients = [{{address = "{HOST}", secret = "{SECRET}", style = "avp", name = "kamailio"}}]\n')
        self.proc = ServiceProcess(config=cfg, workdir=workdir, extra=["--log-level", "info"])

    @property
    def port(self) -> int:
        return self.proc.port

    def start(self) -> RadiusService:
        self.proc.start()
        return self

    def stop(self) -> None:
        self.proc.stop()

    def call(self, op: str, **fields: Any) -> dict[str, Any]:
        c = LineClient(port=self.proc.port)
        try:
            return c.call(op, **fields)
        finally:
            c.close()

    def sizes(self) -> dict[str, int]:
        return profile_sizes(self.port)

    def size(self, profile: str, value: str | None = None) -> int:
        return profile_size(self.port, profile, value)

    def radius_stats(self) -> dict[str, Any]:
        r: dict[str, Any] = self.call("stats").get("radius", {})
        return r

    def wait_zero(self, timeout: float = 8.0) -> dict[str, int]:
        return wait_profiles_zero(self.port, timeout)


class Kamailio(harness.Kamailio):
    """The harness's Kamailio running kamailio-radius.cfg, radcli pointed at the service."""

    listens_evapi = False  # the RADIUS config has no evapi

    def __init__(self, upstream_port: int, auth_port: int, acct_port: int, *, fail_open: bool = False,
                 children: int = 8, cfg: Path = CFG) -> None:
        super().__init__(upstream_port, fail_open=fail_open, children=children, cfg=cfg)
        (self.dir / "servers").write_text(f"{HOST}\t{SECRET}\n")
        self.radcli = self.dir / "radiusclient.conf"
        self.radcli.write_text(
            f"authserver\t{HOST}:{auth_port}:{SECRET}\n"
            f"acctserver\t{HOST}:{acct_port}:{SECRET}\n"
            f"servers\t{self.dir / 'servers'}\n"
            f"dictionary\t{RADCLI_DICT}\n"
            "radius_timeout\t1\nradius_retries\t1\nradius_deadtime\t0\n"
            f"bindaddr\t{HOST}\ndefault_realm\n")

    def policy_defines(self) -> list[str]:
        """radcli's config instead of the evapi listener."""
        return [f'RADIUS_CONFIG="{self.radcli}"']


@dataclass
class Stack:
    uas: Uas
    kam: Kamailio
    svc: RadiusService | None

    def dump(self) -> str:
        out = "---- kamailio ----\n" + self.kam.log()[-5000:]
        if self.svc is not None:
            out += "\n---- callpolicy ----\n" + self.svc.proc.log()[-5000:]
        return out


StackFactory = Callable[..., Stack]


@pytest.fixture
def radius_stack(tmp_path: Path) -> Iterator[StackFactory]:
    """Build UAS + service + Kamailio; all stopped at the end of the test."""
    started: list[Any] = []

    def factory(*, uas: str = "uas.xml", service: bool = True, fail_open: bool = False) -> Stack:
        u = Uas(uas, scenarios=SCENARIOS).start()
        started.append(u)
        svc = None
        if service:
            svc = RadiusService(tmp_path).start()
            started.append(svc)
            auth, acct = svc.auth, svc.acct
        else:
            auth, acct = free_port(), free_port()  # nobody answers there
        k = Kamailio(u.port, auth, acct, fail_open=fail_open).start()
        started.append(k)
        return Stack(u, k, svc)

    yield factory
    for obj in reversed(started):
        obj.stop()
