"""In-process hooks of a replica (what the Lease keeper plugs into): a primary that may
not take its Lease does not serve, but keeps its role so the operator can retry."""

from __future__ import annotations

from pathlib import Path

import pytest

from pairvol.agent.config import AgentConfig
from pairvol.agent.metrics import AgentMetrics
from pairvol.agent.replica import Replica, ReplicaError


async def test_a_failing_before_serve_hook_keeps_the_export_closed(tmp_path: Path) -> None:
    cfg = AgentConfig("vol", tmp_path, 16 << 20, ("127.0.0.1", 1), ("127.0.0.1", 2), tmp_path / "export.sock")
    replica = Replica(cfg, AgentMetrics("vol"))
    await replica.open()
    try:
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
    finally:
        await replica.close()
