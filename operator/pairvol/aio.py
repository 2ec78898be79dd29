"""Small asyncio helpers that teardown paths share.

``task.cancel()`` followed by ``with suppress(BaseException): await task`` looks harmless
but also swallows a cancellation of the *caller*: a task cancelled while it waits for a
child to finish simply carries on. In the agent that turned a teardown into a deadlock (a
link's settle task, cancelled while it was killing the link daemon, went on to wait for
the replica lock that its canceller held). :func:`cancel_and_wait` waits for the children
and lets the caller's own cancellation through.

``process.kill()`` (also ``terminate()``/``send_signal()``) on an asyncio subprocess looks
harmless too, but before Python 3.13 it goes through ``subprocess.Popen.send_signal``,
which first polls the child with ``waitpid(pid, WNOHANG)``. A child that has just exited
(e.g. a client that failed at once) is then reaped there, behind the back of asyncio's
child watcher, whose own ``waitpid`` fails with ECHILD: it logs "Unknown child process pid
N, will report returncode 255" and ``wait()`` returns 255 instead of the child's status.
:func:`signal_child` signals with ``os.kill``, which never reaps, as Python 3.13 does.

``asyncio.wait_for`` looks harmless as well, but before Python 3.12 a task cancelled in the
same turn of the loop as the awaited operation completes gets the operation's result instead
of its cancellation: the cancellation is lost. The local cluster's kubelet hung that way
(a readiness probe whose connect completed as its container exited was told to stop, went
on probing, and the container was never restarted); a Lease keeper or a daemon's shutdown
cancelled at such a moment would carry on the same way. :func:`bounded` bounds a wait with
``asyncio.timeout`` instead, which lets the cancellation through; ``asyncio.wait_for`` is
banned in this repository (ruff, TID251).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Awaitable
from typing import Any, TypeVar

T = TypeVar("T")


async def cancel_and_wait(*tasks: asyncio.Future[Any] | None) -> None:
    """Cancel ``tasks`` (None and the current task are skipped) and wait until they are done;
    their results and exceptions are dropped, a cancellation of the caller is not."""
    current = asyncio.current_task()
    live = [t for t in tasks if t is not None and t is not current]
    for task in live:
        task.cancel()
    if live:
        await asyncio.gather(*live, return_exceptions=True)


def signal_child(process: asyncio.subprocess.Process, sig: int) -> None:
    """Send ``sig`` to ``process`` unless asyncio has collected its exit status.

    Until asyncio collects it, an exited child stays a zombie that holds its pid, so the
    signal cannot reach another process. Left: the moment between the watcher's reaping
    (in its thread) and ``returncode`` being set on the loop, which Python 3.13's own
    ``send_signal`` has too; a pid is reused only after the kernel cycled through all others.
    """
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, sig)


async def bounded(awaitable: Awaitable[T], timeout: float | None) -> T:
    """``await awaitable``, or ``TimeoutError`` (the awaitable cancelled) after ``timeout`` seconds
    (None: no limit). Unlike ``asyncio.wait_for`` on Python 3.11, a cancellation of the
    caller is never traded for the result of an operation that completed at the same time."""
    async with asyncio.timeout(timeout):
        return await awaitable
