"""cancel_and_wait: children are cancelled and awaited; the caller's own cancellation is
not swallowed (swallowing it deadlocked a link teardown, see pairvol.aio)."""

from __future__ import annotations

import asyncio

import pytest

from pairvol.aio import cancel_and_wait


async def test_children_are_cancelled_and_their_errors_dropped() -> None:
    async def forever() -> None:
        await asyncio.sleep(3600)

    async def fails() -> None:
        raise RuntimeError("boom")

    a, b = asyncio.create_task(forever()), asyncio.create_task(fails())
    await asyncio.sleep(0)
    await cancel_and_wait(a, None, b)
    assert a.cancelled() and b.done()


async def test_a_caller_cancelled_while_it_waits_stays_cancelled() -> None:
    release = asyncio.Event()

    async def slow_to_stop() -> None:
        try:
            await asyncio.sleep(3600)
        finally:
            await release.wait()  # cleanup that takes a while

    child = asyncio.create_task(slow_to_stop())
    reached_after = asyncio.Event()

    async def caller() -> None:
        await cancel_and_wait(child)
        reached_after.set()  # must not run: the caller was cancelled meanwhile

    task = asyncio.create_task(caller())
    await asyncio.sleep(0.05)
    task.cancel()
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not reached_after.is_set()


async def test_the_current_task_is_never_awaited() -> None:
    async def me() -> None:
        await cancel_and_wait(asyncio.current_task())

    await asyncio.wait_for(me(), 1)
