"""Small asyncio helpers that the agent's teardown paths share.

``task.cancel()`` followed by ``with suppress(BaseException): await task`` looks harmless
but also swallows a cancellation of the *caller*: a task cancelled while it waits for a
child to finish simply carries on. In the agent that turned a teardown into a deadlock (a
link's settle task, cancelled while it was killing the link daemon, went on to wait for
the replica lock that its canceller held). :func:`cancel_and_wait` waits for the children
and lets the caller's own cancellation through.
"""

from __future__ import annotations

import asyncio
from typing import Any


async def cancel_and_wait(*tasks: asyncio.Future[Any] | None) -> None:
    """Cancel ``tasks`` (None and the current task are skipped) and wait until they are done;
    their results and exceptions are dropped, a cancellation of the caller is not."""
    current = asyncio.current_task()
    live = [t for t in tasks if t is not None and t is not current]
    for task in live:
        task.cancel()
    if live:
        await asyncio.gather(*live, return_exceptions=True)
