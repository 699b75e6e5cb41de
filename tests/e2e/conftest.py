"""Fixtures for the Kamailio end-to-end tests: a sipp UAS, Kamailio with the shipped config,
and a real `callpolicy serve` connected to it over evapi. Everything is stopped afterwards."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from tests.e2e.harness import Kamailio, Uas, missing_tools, service_config
from tests.helpers import ServiceProcess

MISSING = missing_tools()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Skip the tests marked `kamailio` when kamailio/sipp/kamcmd are not installed."""
    if not MISSING:
        return
    for item in items:
        if item.get_closest_marker("kamailio") is not None:
            item.add_marker(pytest.mark.skip(reason=MISSING))


@dataclass
class Stack:
    """One proxy: the UAS behind it, Kamailio, and (unless service=False) callpolicy."""

    uas: Uas
    kam: Kamailio
    svc: ServiceProcess | None
    #: the service this stack runs, or would run (service=False): start it later with `start_service`
    service_proc: ServiceProcess | None = None

    @property
    def port(self) -> int:
        """callpolicy's TCP port (for LineClient)."""
        assert self.svc is not None
        return self.svc.port

    def dump(self) -> str:
        """Logs for a failure message."""
        out = "---- kamailio ----\n" + self.kam.log()[-6000:]
        if self.svc is not None:
            out += "\n---- callpolicy ----\n" + self.svc.log()[-6000:]
        return out


StackFactory = Callable[..., Stack]


@pytest.fixture
def make_stack() -> Iterator[StackFactory]:
    """Build stacks; everything started is stopped at the end of the test."""
    started: list[Any] = []

    def factory(*, uas: str = "uas.xml", uas_subst: dict[str, str] | None = None, fail_open: bool = False,
                timeout_ms: int = 500, service: bool = True, store: str | None = None,
                uas_obj: Uas | None = None, reconcile_interval: float = 60.0, grace: float = 10.0,
                snapshot_interval: float = 10.0) -> Stack:
        u = uas_obj
        if u is None:
            u = Uas(uas, subst=uas_subst).start()
            started.append(u)
        k = Kamailio(u.port, fail_open=fail_open, timeout_ms=timeout_ms).start()
        started.append(k)
        svc = ServiceProcess(store=store, extra=["--evapi", k.evapi, "--log-level", "debug"])
        svc.config = service_config(svc.workdir, reconcile_interval=reconcile_interval, grace=grace,
                                    snapshot_interval=snapshot_interval)
        started.append(svc)  # stopped at the end even when the test starts it later
        if service:
            svc.start()
            k.wait_clients(1)
        return Stack(u, k, svc if service else None, svc)

    yield factory
    for obj in reversed(started):
        obj.stop()
