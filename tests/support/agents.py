"""Real agents for tests: pairs and groups of `pairvol agent` processes, always cleaned
up by PID (see pairvol.agent.procs)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from pairvol.agent.procs import Agent, AgentCallError, free_port, write_psk

__all__ = ["Agent", "AgentCallError", "agents", "free_port", "pair", "write_psk"]


@contextlib.asynccontextmanager
async def agents(tmp: Path, count: int = 2, size: str = "64Mi", **kw: Any) -> AsyncIterator[list[Agent]]:
    made = [Agent(name="vol", data_dir=tmp / f"replica-{i}", size=size, **kw) for i in range(count)]
    try:
        await asyncio.gather(*(a.start() for a in made))
        yield made
    finally:
        await asyncio.gather(*(a.stop() for a in made), return_exceptions=True)


@contextlib.asynccontextmanager
async def pair(tmp: Path, size: str = "64Mi", sync: str = "full", **kw: Any) -> AsyncIterator[tuple[Agent, Agent]]:
    """A replicating pair: replica-0 primary (epoch 2), replica-1 secondary (epoch 1)."""
    async with agents(tmp, 2, size, **kw) as (p, s):
        await s.secondary(1)
        await p.primary(2, s.replication_address, sync)
        await p.wait_replicating()
        yield p, s
