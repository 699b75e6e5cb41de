"""Background tasks never die silently: a failure is logged with its traceback and the task restarts.

`supervise(name, factory, restarts)` runs `await factory()` until it is cancelled. When the
coroutine raises, the error is logged (`task_failed`, level error, with the traceback), the
restart is counted in `restarts[name]` (shown in `stats` as `tasks` and in /metrics), and a
new coroutine is started after a backoff that doubles from `initial` to `maximum` and starts
over once a run lasted longer than `maximum`. A coroutine that returns on its own has finished
its work: logged, not restarted.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import structlog

log = structlog.get_logger("policy.supervise")


async def supervise(name: str, factory: Callable[[], Awaitable[Any]], restarts: Counter[str], *,
                    initial: float = 0.1, maximum: float = 30.0) -> None:
    """Run `factory()` again and again until cancelled, logging and counting each failure."""
    delay = initial
    restarts.setdefault(name, 0)
    while True:
        started = time.monotonic()
        try:
            await factory()
        except asyncio.CancelledError:
            raise
        except Exception:
            if time.monotonic() - started > maximum:
                delay = initial  # it had been running fine: a new failure starts the backoff over
            restarts[name] += 1
            log.exception("task_failed", task=name, restarts=restarts[name], retry_in=round(delay, 3))
            await asyncio.sleep(delay)
            delay = min(delay * 2, maximum)
            continue
        log.info("task_finished", task=name)
        return


def start(name: str, factory: Callable[[], Awaitable[Any]], restarts: Counter[str], **kw: float) -> asyncio.Task[None]:
    """`supervise` as a named Task."""
    return asyncio.create_task(supervise(name, factory, restarts, **kw), name=f"callpolicy:{name}")
