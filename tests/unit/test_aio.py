"""cancel_and_wait: children are cancelled and awaited; the caller's own cancellation is
not swallowed (swallowing it deadlocked a link teardown, see pairvol.aio).

signal_child: signalling a child never collects its exit status behind asyncio's back
(``Process.kill()`` did, before Python 3.13: "Unknown child process pid N, will report
returncode 255", and ``wait()`` returned 255 instead of the child's status).

bounded: a wait with a time limit that lets a cancellation through even when the awaited operation
completes in the same turn of the loop (``asyncio.wait_for`` on Python 3.11 returns the
result instead; the local cluster's kubelet hung on it)."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import threading
from collections.abc import Awaitable, Callable, Iterator

import pytest

from pairvol.aio import bounded, cancel_and_wait, signal_child


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

    await bounded(me(), 1)


@pytest.fixture
def watcher_thread_held(monkeypatch: pytest.MonkeyPatch) -> Iterator[threading.Event]:
    """asyncio's child-watcher thread (ThreadedChildWatcher, the default before 3.13 and the
    fallback without pidfds) is held before it collects a child until the returned event is
    set: the scheduling delay that, on a busy machine, lets the event loop act on a child that
    has exited but whose exit asyncio has not yet collected. (The pidfd watcher collects on
    the loop thread, which these tests do not let run in that window; it is not held.)"""
    loop_thread = threading.current_thread()
    release = threading.Event()
    real_waitpid = os.waitpid

    def waitpid(pid: int, options: int) -> tuple[int, int]:
        if threading.current_thread() is not loop_thread and options == 0:
            release.wait(10)
        return real_waitpid(pid, options)

    monkeypatch.setattr(os, "waitpid", waitpid)
    try:
        yield release
    finally:
        release.set()


async def test_a_child_that_just_exited_keeps_its_exit_status(
    watcher_thread_held: threading.Event, caplog: pytest.LogCaptureFixture
) -> None:
    # `make demo`'s writer: qemu-io fails at once against the dead node's socket and is
    # killed right after, before asyncio collected its exit
    proc = await asyncio.create_subprocess_exec("sh", "-c", "exit 3")
    # Blocks the loop on purpose (asyncio must not act yet) until the child has exited,
    # without collecting it (WNOWAIT).
    os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)  # noqa: ASYNC222
    assert proc.returncode is None
    with caplog.at_level(logging.WARNING, logger="asyncio"):
        signal_child(proc, signal.SIGKILL)
        watcher_thread_held.set()
        assert await bounded(proc.wait(), 10) == 3
    assert [r.getMessage() for r in caplog.records if r.name == "asyncio"] == []


async def test_a_running_child_gets_the_signal() -> None:
    proc = await asyncio.create_subprocess_exec("sleep", "3600")
    signal_child(proc, signal.SIGTERM)
    assert await bounded(proc.wait(), 10) == -signal.SIGTERM


async def test_a_collected_child_is_not_signalled_again() -> None:
    proc = await asyncio.create_subprocess_exec("true")
    assert await bounded(proc.wait(), 10) == 0
    signal_child(proc, signal.SIGKILL)  # its pid may belong to another process by now
    assert proc.returncode == 0


async def _cancelled_as_it_completes(wait: Callable[[asyncio.Future[str]], Awaitable[str]]) -> str:
    """Cancel a task in the same turn of the loop as the operation it waits for completes."""
    operation: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(wait(operation))
    await asyncio.sleep(0)  # the task now waits
    operation.set_result("completed")
    task.cancel()
    try:
        return await task
    except asyncio.CancelledError:
        return "cancelled"


async def test_a_cancellation_that_coincides_with_completion_is_not_lost() -> None:
    assert await _cancelled_as_it_completes(lambda op: bounded(op, 5)) == "cancelled"


async def test_asyncio_wait_for_loses_that_cancellation_before_python_3_12() -> None:
    """Why asyncio.wait_for is banned (ruff TID251): the hang :func:`bounded` avoids. Python
    3.12 rebuilt it on asyncio.timeout; the suite runs on 3.11 and on 3.13 (Debian 13)."""
    wait_for = getattr(asyncio, "wait_for")  # noqa: B009 - the banned call, named only here
    lost = sys.version_info < (3, 12)
    assert await _cancelled_as_it_completes(lambda op: wait_for(op, 5)) == ("completed" if lost else "cancelled")


async def test_bounded_returns_the_result_and_times_out_by_cancelling_the_operation() -> None:
    assert await bounded(asyncio.sleep(0, "done"), 1) == "done"
    assert await bounded(asyncio.sleep(0, "unbounded"), None) == "unbounded"
    slow = asyncio.ensure_future(asyncio.sleep(3600))
    with pytest.raises(TimeoutError):
        await bounded(slow, 0.01)
    assert slow.cancelled()
