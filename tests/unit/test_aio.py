"""cancel_and_wait: children are cancelled and awaited; the caller's own cancellation is
not swallowed (swallowing it deadlocked a link teardown, see pairvol.aio).

signal_child: signalling a child never collects its exit status behind asyncio's back
(``Process.kill()`` did, before Python 3.13: "Unknown child process pid N, will report
returncode 255", and ``wait()`` returned 255 instead of the child's status)."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
from collections.abc import Iterator

import pytest

from pairvol.aio import cancel_and_wait, signal_child


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
        assert await asyncio.wait_for(proc.wait(), 10) == 3
    assert [r.getMessage() for r in caplog.records if r.name == "asyncio"] == []


async def test_a_running_child_gets_the_signal() -> None:
    proc = await asyncio.create_subprocess_exec("sleep", "3600")
    signal_child(proc, signal.SIGTERM)
    assert await asyncio.wait_for(proc.wait(), 10) == -signal.SIGTERM


async def test_a_collected_child_is_not_signalled_again() -> None:
    proc = await asyncio.create_subprocess_exec("true")
    assert await asyncio.wait_for(proc.wait(), 10) == 0
    signal_child(proc, signal.SIGKILL)  # its pid may belong to another process by now
    assert proc.returncode == 0
