"""A volume whose data directory nests in another's is refused — by the real operator process,
which knows the other volumes from its watch caches."""

from __future__ import annotations

from typing import Any

import pytest

from pairvol.kube.client import KubeError
from pairvol.kube.paths import volume_path
from pairvol.localcluster.demo import Stack

pytestmark = [pytest.mark.e2e, pytest.mark.netns, pytest.mark.timeout(120)]


async def test_a_volume_nested_in_another_ones_data_directory_is_refused_until_made_again_elsewhere(
    stack: Stack, volume: Any
) -> None:
    ns = stack.namespace
    # both stay unplaced (node-9 does not exist): no agent needs to start for the rule to apply
    await stack.apply(volume("first", nodes=["node-1", "node-9"]))  # /var/lib/pairvol/<ns>/first
    nested = {"hostPath": f"/var/lib/pairvol/{ns}/first"}
    await stack.apply(volume("second", nodes=["node-1", "node-9"], storage=nested))

    st = await stack.wait_phase("second", "Pending", within=30)
    assert st["message"].startswith(
        f"no replica placed: its data directory /var/lib/pairvol/{ns}/first/{ns}/second lies inside "
        f"/var/lib/pairvol/{ns}/first, the data directory of ReplicatedVolume {ns}/first"
    ), st["message"]
    assert "DataDirConflict" in {e["reason"] for e in await stack.events("second") if e["type"] == "Warning"}
    first = await stack.wait_phase("first", "Pending", within=30)
    assert "need two eligible nodes" in first["message"], "the earlier volume is not held up"
    assert await stack.pods("second") == []

    with pytest.raises(KubeError, match=r"storage\.hostPath cannot change"):
        await stack.kube.merge_patch(volume_path(ns, "second"), {"spec": {"storage": {"hostPath": "/srv"}}})
    await stack.kube.delete(volume_path(ns, "second"))
    await stack.wait_for("the refused volume to be gone", lambda: gone(stack, "second"), within=30)
    await stack.apply(volume("second", nodes=["node-1", "node-9"], storage={"hostPath": "/var/lib/pairvol"}))

    async def placed_as_usual() -> bool:
        return "need two eligible nodes" in (await stack.status("second")).get("message", "")

    await stack.wait_for("second to be judged like any other volume", placed_as_usual, within=30)


async def gone(stack: Stack, name: str) -> bool:
    return await stack.kube.get_or_none(volume_path(stack.namespace, name)) is None
