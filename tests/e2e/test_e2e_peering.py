"""Two operator replicas with kopf peering: only the highest-priority live one acts."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from pairvol.localcluster.demo import OperatorProcess, Stack

pytestmark = [pytest.mark.e2e, pytest.mark.netns, pytest.mark.timeout(180)]


def acted(log: str) -> bool:
    return "created primary pod" in log or "Scheduled" in log


async def read(op: OperatorProcess) -> str:
    return await asyncio.to_thread(op.log_path.read_text, errors="replace")


async def test_only_one_operator_replica_acts_and_the_other_takes_over(
    tmp_path: Any, volume: Any, operator_pod: dict[str, Any]
) -> None:
    import os

    if os.geteuid() != 0:
        pytest.skip("needs root")
    async with Stack.up(3, peering="pairvol-e2e", operator_pod=operator_pod,
                        operator_env={"PAIRVOL_PEERING_PRIORITY": "100"}) as s:
        second = OperatorProcess(s.cluster.kubeconfig_path, s.root / "operator-2.log",
                                 {**s.operator.env, "PAIRVOL_PEERING_PRIORITY": "200"}, operator_pod)
        await second.start()
        try:
            await s.wait_for("the high-priority replica to become active",
                             lambda: _contains(second, "Resuming operations"), within=30)
            # the low-priority replica is paused while a higher one lives (it may have run
            # alone for a moment before the other appeared)
            await s.wait_for("the low-priority replica to be paused",
                             lambda: _paused(s.operator), within=30)
            # a volume that never gets agents still shows who acts: only one replica schedules
            await s.apply(volume("peered", nodes=["node-1", "node-2"]))
            await s.wait_for("the active replica to act", lambda: _acts(second), within=30)
            assert not acted(await read(s.operator)), "the paused replica must not act"

            await second.stop(kill=True)  # the active replica dies without saying goodbye
            await s.wait_for("the paused replica to resume",
                             lambda: _contains(s.operator, "Resuming operations"), within=30)
            await s.apply(volume("after", nodes=["node-2", "node-3"]))
            await s.wait_for("the remaining replica to act", lambda: _acts(s.operator),
                             within=30)
        finally:
            await second.stop(kill=True)


async def _paused(op: OperatorProcess) -> bool:
    """Alive, taking part in the peering (its keep-alives), and not resumed since its last
    pause. kopf starts with operations paused until it has seen its peers, so a replica
    that met the higher one at once never logs a pause; one that ran alone first logs
    "Pausing operations in favour" afterwards. A crashed process is not paused."""
    alive = op.proc is not None and op.proc.returncode is None
    log = await read(op)
    peering = "Keep-alive in 'pairvol-e2e'" in log
    resumed = log.rfind("Resuming operations")
    paused = log.rfind("Pausing operations in favour")
    return alive and peering and (resumed < 0 or paused > resumed)


async def _contains(op: OperatorProcess, text: str) -> bool:
    return text in await read(op)


async def _acts(op: OperatorProcess) -> bool:
    return acted(await read(op))
