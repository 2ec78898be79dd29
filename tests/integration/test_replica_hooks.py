"""In-process hooks of a replica (what the Lease keeper plugs into): a primary that may
not take its Lease does not serve, but keeps its role so the operator can retry."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from pairvol.agent import state as persist
from pairvol.agent.config import AgentConfig
from pairvol.agent.metrics import AgentMetrics
from pairvol.agent.replica import Replica, ReplicaError
from pairvol.agent.stages import IllegalTransition
from pairvol.aio import bounded


@pytest.fixture
async def replica(tmp_path: Path) -> AsyncIterator[Replica]:
    """A replica on its own data dir, no peer; closed (its daemon stopped) after the test."""
    cfg = AgentConfig("vol", tmp_path, 16 << 20, ("127.0.0.1", 1), ("127.0.0.1", 2), tmp_path / "export.sock")
    r = Replica(cfg, AgentMetrics("vol"))
    await r.open()
    try:
        yield r
    finally:
        await r.close()


async def test_a_failing_before_serve_hook_keeps_the_export_closed(replica: Replica, tmp_path: Path) -> None:
    calls: list[int] = []

    async def no_lease(epoch: int) -> None:
        calls.append(epoch)
        raise RuntimeError("lease pairvol-vol is held by node-b until 12:00:03")

    replica.before_serve_hooks.append(no_lease)
    with pytest.raises(ReplicaError, match="refusing to serve the workload export: lease pairvol-vol is held"):
        await replica.start_primary(4, None, "none")
    st = replica.status()
    assert calls == [4]
    assert (st["role"], st["epoch"], st["export"]["serving"]) == ("primary", 4, False)
    assert not (tmp_path / "export.sock").exists()
    replica.before_serve_hooks.clear()
    await replica.start_primary(5, None, "none")
    assert replica.status()["export"]["serving"] is True


async def test_a_refused_start_says_durably_that_nothing_was_served_at_its_epoch(
    replica: Replica, tmp_path: Path
) -> None:
    # what the operator relies on to promote a secondary it marked OutOfSync for a restart in
    # place that could not take the Lease: refusedEpoch equal to the epoch means nothing was
    # served at that epoch, and nothing will be (a newer epoch is needed to serve)
    await replica.start_primary(3, None, "none")
    assert replica.status()["export"]["refusedEpoch"] is None

    async def no_lease(epoch: int) -> None:
        raise RuntimeError(f"lease not taken at epoch {epoch}")

    replica.before_serve_hooks.append(no_lease)
    await replica.fence_workload("lease lost: another replica may be promoted", "lease")
    assert replica.status()["export"]["fencedBy"] == "lease"
    with pytest.raises(ReplicaError, match="refusing to serve"):
        await replica.start_primary(4, None, "none")
    export = replica.status()["export"]
    assert (export["serving"], export["refusedEpoch"], replica.status()["epoch"]) == (False, 4, 4)
    found = persist.load(tmp_path)
    assert found is not None and (found.epoch, found.refused_epoch) == (4, 4), "not durable"
    replica.before_serve_hooks.clear()
    with pytest.raises(IllegalTransition, match="does not advance"):
        await replica.start_primary(4, None, "none")  # the refused epoch never serves
    assert replica.status()["export"]["serving"] is False
    await replica.start_primary(5, None, "none")
    export = replica.status()["export"]
    assert (export["serving"], export["fencedBy"]) == (True, None)


async def test_the_status_says_busy_while_a_start_may_still_serve(replica: Replica) -> None:
    # the operator does not judge a primary that does not serve while its agent is busy: a
    # start sent by an operator process that has died may still take the Lease and serve
    taking, go_on = asyncio.Event(), asyncio.Event()

    async def slow_lease(epoch: int) -> None:
        taking.set()
        await go_on.wait()

    replica.before_serve_hooks.append(slow_lease)
    start = asyncio.create_task(replica.start_primary(3, None, "none"))
    await bounded(taking.wait(), 10)
    st = replica.status()
    assert (st["epoch"], st["export"]["serving"], st["busy"]) == (3, False, True)
    go_on.set()
    await bounded(start, 10)
    st = replica.status()
    assert (st["export"]["serving"], st["busy"]) == (True, False)
