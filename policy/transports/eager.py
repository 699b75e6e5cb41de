"""Run a request handler eagerly: most checks finish without ever suspending.

On the embedded store a request never waits on I/O, so creating a Task for it (and a
loop callback to run it, and another to deliver its result) is pure overhead. `start`
runs the coroutine synchronously up to its first real suspension; only a coroutine that
does suspend (a Redis round trip) is handed to a Task to finish. This is what Python
3.12's eager task factory does, for 3.11.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def start(coro: Coroutine[Any, Any, T]) -> tuple[bool, Any]:
    """Run `coro` until it first suspends: (True, its result) if it finished, else (False, a Task
    that finishes it)."""
    try:
        yielded = coro.send(None)
    except StopIteration as stop:
        return True, stop.value
    return False, asyncio.ensure_future(_resume(coro, yielded))


def schedule(coro: Coroutine[Any, Any, T]) -> tuple[bool, Any]:
    """`start`'s signature for handlers that will suspend anyway (a Redis round trip): a Task."""
    return False, asyncio.ensure_future(coro)


def starter(inline: bool) -> Callable[[Coroutine[Any, Any, Any]], tuple[bool, Any]]:
    """`start` when the service's store answers inline, else `schedule`."""
    return start if inline else schedule


async def _resume(coro: Coroutine[Any, Any, T], yielded: Any) -> T:
    """Drive a coroutine that suspended on `yielded` to completion (Task.__step's protocol)."""
    while True:
        if yielded is None:  # a bare `yield` (asyncio.sleep(0))
            await asyncio.sleep(0)
        else:
            yielded._asyncio_future_blocking = False
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await yielded  # wait until done; the coroutine reads the outcome itself
        try:
            yielded = coro.send(None)
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]
