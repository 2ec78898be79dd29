"""The volume condition of NodeGetVolumeStats follows the volume's replication, on the local
cluster.

What the kubelet would ask for a mounted claim, asked through the node plugin's real socket:
while the volume replicates, the condition is normal and says so; once its secondary is
lost (its agent's pod killed) the condition is abnormal with the reason (the secondary is
OutOfSync, the volume Degraded: one more failure loses data or the volume); after the
operator re-protected the volume on a new secondary, normal again. The node plugin reads
the ReplicatedVolume with a token of the chart's ``csi-node`` ServiceAccount (it may only
``get`` them), through the API server as a pod of its node reaches it. The pod writes all
along and sees no error.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from tests.e2e.test_e2e_csi import (  # noqa: F401 - the csi fixture
    PODS,
    STREAM_WRITER,
    acked_at_least,
    claimed,
    csi,
    pod,
    pod_log,
    records_acked,
    until_writing,
)

from pairvol.localcluster.csi_client import CsiClient
from pairvol.localcluster.csi_plugins import LocalCsi
from pairvol.localcluster.demo import Stack

pytestmark = pytest.mark.timeout(150)


async def test_the_volume_condition_is_abnormal_while_the_volume_is_degraded_and_normal_once_reprotected(
    stack: Stack,
    csi: LocalCsi,  # noqa: F811
) -> None:
    pv_name = await claimed(stack, "data", "Filesystem")
    st = await stack.status(pv_name)
    secondary = st["secondary"]
    (node,) = sorted(set(stack.sim.node_names) - {st["primary"]["node"], secondary["node"]})
    await stack.kube.create(PODS, pod("writer", node, "data", STREAM_WRITER, "0"))
    await until_writing(stack, "writer", "its first records", lambda: acked_at_least(stack, node, "writer", 5), 30)
    uid = (await stack.kube.get(f"{PODS}/writer"))["metadata"]["uid"]
    published = csi.kubelet_dir(node) / "pods" / uid / "volumes" / "kubernetes.io~csi" / pv_name / "mount"
    socket = csi.node_plugins[node].socket

    async def condition() -> dict[str, Any]:
        """What the kubelet's NodeGetVolumeStats shows of the pod's volume."""
        async with CsiClient(socket, timeout=10) as client:
            stats = await client.call(
                "Node", "NodeGetVolumeStats", {"volumeId": f"default/{pv_name}", "volumePath": str(published)}
            )
        assert {u["unit"] for u in stats["usage"]} == {"BYTES", "INODES"}
        return dict(stats["volumeCondition"])

    assert await asyncio.to_thread(published.is_dir)
    healthy = await condition()
    assert not healthy.get("abnormal") and "replication: Replicating" in healthy["message"], healthy

    await stack.sim.kill_pod("default", secondary["pod"])

    # the primary first holds writes the lost secondary lacks (OutOfSync), then the operator
    # calls the volume Degraded: either way the condition says why the volume is at risk
    reasons = {
        "OutOfSync": f"secondary on {secondary['node']} is OutOfSync: it lacks writes the primary acknowledged",
        "Degraded": "the volume is Degraded (",
    }
    seen: list[str] = []

    async def abnormal() -> dict[str, Any] | None:
        now = await condition()
        if now.get("abnormal"):
            seen.append(now["message"])
        return now if now.get("abnormal") else None

    await stack.wait_for("the condition abnormal", abnormal, 30, every=0.2)

    async def reprotected() -> dict[str, Any] | None:
        now = await stack.status(pv_name)
        cond = await condition()
        if cond.get("abnormal"):
            seen.append(cond["message"])
        if now.get("phase") != "Replicating" or (now.get("secondary") or {}).get("pod") == secondary["pod"]:
            return None
        return cond if not cond.get("abnormal") else None

    normal = await stack.wait_for("re-protected and the condition normal again", reprotected, 90, every=0.2)
    # the new secondary lacks the writes too until its sync ends (a loaded machine shows it)
    fresh = (await stack.status(pv_name))["secondary"]["node"]
    reasons["OutOfSync (new)"] = f"secondary on {fresh} is OutOfSync: it lacks writes the primary acknowledged"
    unexplained = [m for m in seen if not any(text in m for text in reasons.values())]
    assert not unexplained, f"abnormal for another reason than the lost secondary: {unexplained}"
    assert "replication: Replicating" in normal["message"], normal
    before = await records_acked(stack, node, "writer")
    await stack.wait_for("the writer writing on", lambda: acked_at_least(stack, node, "writer", before + 5), 30)
    assert "Error" not in await pod_log(stack, node, "writer")
