"""Many volumes share few nodes: every agent pod has its own network namespace and IP,
so agents of different volumes on one node all listen on 7800-7802 without a clash.

20 volumes on 3 nodes means 40 agent pods, 13-14 per node, each with a real
qemu-storage-daemon, replicating over pod IPs, all probed by the one node-simulator
process. That takes minutes on two shared cores, so the test is marked ``scale`` and left
out of ``make test`` / ``make e2e`` (tests/e2e/conftest.py deselects it); ``make
test-scale`` runs it. It uses the operator's default lease and a kubelet grace of 10 s: it
is about capacity, not about how fast a failure is noticed.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator
from typing import Any

import pytest

from pairvol.localcluster.demo import Stack
from pairvol.operator.manifests import OperatorConfig

pytestmark = [pytest.mark.e2e, pytest.mark.netns, pytest.mark.scale, pytest.mark.timeout(600)]

VOLUMES = 20


@pytest.fixture
async def roomy_stack(operator_pod: dict[str, Any], chart_rbac: list[dict[str, Any]]) -> AsyncIterator[Stack]:
    lease = OperatorConfig().lease_duration_s
    async with Stack.up(
        3, lease_duration=lease, node_monitor_grace=10.0, operator_pod=operator_pod, rbac=chart_rbac
    ) as s:
        yield s


async def test_twenty_volumes_on_three_nodes_all_reach_replicating(roomy_stack: Stack, volume: Any) -> None:
    stack = roomy_stack
    names = [f"many-{i:02d}" for i in range(VOLUMES)]
    for name in names:
        await stack.apply(volume(name, size="16Mi"))

    statuses = await asyncio.gather(*(stack.wait_phase(name, "Replicating", within=400) for name in names))

    pods = [p for name in names for p in await stack.pods(name)]
    per_node = collections.Counter(p["spec"]["nodeName"] for p in pods)
    assert len(pods) == 2 * VOLUMES and max(per_node.values()) > 3, per_node
    ips = [p["status"]["podIP"] for p in pods]
    assert len(set(ips)) == len(ips), "every agent has an address of its own"
    assert all(p["status"]["podIP"] != p["status"]["hostIP"] for p in pods)
    for st in statuses:
        assert st["primary"]["node"] != st["secondary"]["node"]
