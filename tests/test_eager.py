"""The eager runner: inline results without a Task, and a correct hand-over when a coroutine suspends."""

from __future__ import annotations

import asyncio

import pytest

from policy.transports import eager


async def test_a_coroutine_that_never_suspends_finishes_inline() -> None:
    """No Task, the result at once."""

    async def work() -> int:
        return 42

    assert eager.start(work()) == (True, 42)


async def test_a_coroutine_that_suspends_is_finished_by_a_task() -> None:
    """Suspending on a bare yield and on futures (result and exception) resumes correctly."""
    loop = asyncio.get_running_loop()
    first: asyncio.Future[str] = loop.create_future()
    second: asyncio.Future[str] = loop.create_future()

    async def work() -> str:
        await asyncio.sleep(0)
        a = await first
        try:
            await second
        except KeyError as exc:
            return f"{a}+{exc.args[0]}"
        return "no error"

    done, task = eager.start(work())
    assert done is False
    loop.call_soon(first.set_result, "one")
    loop.call_later(0.01, second.set_exception, KeyError("two"))
    assert await asyncio.wait_for(task, 5) == "one+two"


async def test_an_exception_after_suspending_reaches_the_task() -> None:
    """An error raised after the first suspension is the task's exception."""

    async def work() -> None:
        await asyncio.sleep(0)
        raise ValueError("boom")

    done, task = eager.start(work())
    assert done is False
    with pytest.raises(ValueError, match="boom"):
        await task


async def test_schedule_always_makes_a_task() -> None:
    """Stores that suspend anyway get a plain Task."""

    async def work() -> int:
        return 1

    done, task = eager.starter(False)(work())
    assert done is False and await task == 1
    assert eager.starter(True) is eager.start
