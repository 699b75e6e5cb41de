"""systemd's notification protocol (sd_notify(3)): READY, RELOADING, STOPPING, STATUS, WATCHDOG.

Under `Type=notify` systemd passes `NOTIFY_SOCKET` (a Unix datagram socket; a leading `@`
means the abstract namespace) and, with `WatchdogSec=`, `WATCHDOG_USEC` (and
`WATCHDOG_PID`). Each notification is one datagram of `KEY=VALUE` lines. Without
`NOTIFY_SOCKET` (not under systemd) every call here does nothing.

The protocol is one `sendto`; a library (python-systemd needs libsystemd's headers to
build, `sdnotify` is this function) would not pay for itself.

The watchdog pings come from a task on the event loop, so a loop that stalls stops them
and systemd restarts the service - the point of the watchdog.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Mapping

import structlog

log = structlog.get_logger("policy.sdnotify")


def notify(*fields: str, environ: Mapping[str, str] | None = None) -> bool:
    """Send `fields` (e.g. "READY=1", "STATUS=...") to systemd; False when there is nobody to tell."""
    env = os.environ if environ is None else environ
    addr = env.get("NOTIFY_SOCKET", "")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    elif not addr.startswith("/"):
        log.warning("sd_notify_bad_socket", socket=addr)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(addr)
            sock.sendall("\n".join(fields).encode())
    except OSError as exc:
        log.warning("sd_notify_failed", socket=env.get("NOTIFY_SOCKET"), error=str(exc))
        return False
    return True


def ready(status: str) -> bool:
    """The service is up (`READY=1`), with a status line for `systemctl status`."""
    return notify("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")


def reloading() -> bool:
    """A reload starts (`RELOADING=1`; `ready` again when it is done)."""
    return notify("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")


def stopping() -> bool:
    """The service is stopping (`STOPPING=1`)."""
    return notify("STOPPING=1", "STATUS=stopping")


def watchdog_interval(environ: Mapping[str, str] | None = None) -> float | None:
    """Seconds between two watchdog pings (half of `WATCHDOG_USEC`), or None when no watchdog is asked for."""
    env = os.environ if environ is None else environ
    usec = env.get("WATCHDOG_USEC", "")
    pid = env.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if pid and pid.isdigit() and int(pid) != os.getpid():
        return None  # meant for another process (e.g. a wrapper that exec'd us under another pid)
    return int(usec) / 1e6 / 2


async def watchdog(interval: float) -> None:
    """Ping the watchdog every `interval` seconds from the event loop (until cancelled)."""
    while True:
        notify("WATCHDOG=1")
        await asyncio.sleep(interval)
