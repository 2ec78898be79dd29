"""A StorageClass with ``reclaimPolicy: Retain`` keeps the volume when its claim goes, on the
local cluster.

The claim is deleted after a pod wrote fsynced records into its file system: its PV becomes
``Released`` and stays, and so do the ReplicatedVolume (still replicating, both agents
running) and both replicas' images; DeleteVolume is never called. An administrator takes
the data back as on any Kubernetes cluster: removes the PV's ``claimRef`` (the PV is
``Available``) and creates a claim naming the PV in ``spec.volumeName``; the claim is bound
to it (not provisioned anew), and a pod on another node finds every record.
(``reclaimPolicy: Delete``, the chart's default: tests/e2e/test_e2e_csi.py.)
"""

from __future__ import annotations

from typing import Any

import pytest
from tests.e2e.test_e2e_csi import (  # noqa: F401 - the csi fixture
    CLAIM,
    CLAIMS,
    FS_SIZE,
    PODS,
    RECORDS,
    VERIFIER,
    VOLUMES,
    WRITER,
    claim_of_a_class_like_the_charts,
    csi,
    delete_pod,
    finished,
    kubectl,
    pod,
    pod_log,
    until_writing,
)

from pairvol.localcluster.csi_plugins import LocalCsi
from pairvol.localcluster.demo import Stack

pytestmark = pytest.mark.timeout(150)


async def test_a_retained_volume_outlives_its_claim_and_is_bound_again_with_its_data(
    stack: Stack,
    csi: LocalCsi,  # noqa: F811
) -> None:
    await claim_of_a_class_like_the_charts(stack, "data", "pairvol-retain", reclaimPolicy="Retain")

    async def bound(name: str) -> dict[str, Any] | None:
        got = await stack.kube.get(f"{CLAIMS}/{name}")
        return got if (got.get("status") or {}).get("phase") == "Bound" else None

    claim = await stack.wait_for("claim data Bound", lambda: bound("data"), 60)
    pv_name = claim["spec"]["volumeName"]
    pv = await stack.kube.get(f"/api/v1/persistentvolumes/{pv_name}")
    assert pv["spec"]["persistentVolumeReclaimPolicy"] == "Retain"
    st = await stack.status(pv_name)
    replicas = [st["primary"]["node"], st["secondary"]["node"]]
    await stack.kube.create(PODS, pod("writer", "node-1", "data", WRITER))

    async def written() -> bool:
        return f"written {RECORDS}" in await pod_log(stack, "node-1", "writer")

    await until_writing(stack, "writer", "the writer's records fsynced", written, 60)
    await delete_pod(stack, "writer")

    # the claim goes; the PV is Released, and nothing else goes
    await stack.kube.delete(f"{CLAIMS}/data")

    async def released() -> dict[str, Any] | None:
        got = await stack.kube.get_or_none(f"/api/v1/persistentvolumes/{pv_name}")
        return got if got and (got.get("status") or {}).get("phase") == "Released" else None

    await stack.wait_for(f"{pv_name} Released", released, 30)
    assert await stack.kube.get_or_none(f"{CLAIMS}/data") is None
    st = await stack.wait_phase(pv_name, "Replicating", within=10)
    assert sorted([st["primary"]["node"], st["secondary"]["node"]]) == sorted(replicas), st
    for node in replicas:
        disk = stack.sim.host_path(node, f"/var/lib/pairvol/default/{pv_name}/disk.raw")
        assert disk.is_file(), f"the replica's image on {node} is kept"

    # the administrator frees the PV; a claim that names it gets it back, data and all
    code, out, err = await kubectl(stack, "patch", "pv", pv_name, "-p", '{"spec":{"claimRef":null}}')
    assert code == 0, out + err

    async def available() -> bool:
        got = await stack.kube.get(f"/api/v1/persistentvolumes/{pv_name}")
        return (got.get("status") or {}).get("phase") == "Available"

    await stack.wait_for(f"{pv_name} Available", available, 30)
    claim_yaml = CLAIM.format(name="again", mode="Filesystem", size=FS_SIZE).replace(
        "storageClassName: pairvol", "storageClassName: pairvol-retain"
    )
    again = claim_yaml.replace("spec:\n", f"spec:\n  volumeName: {pv_name}\n")
    code, _, err = await kubectl(stack, "apply", "-f", "-", stdin=again)
    assert code == 0, err
    claim = await stack.wait_for("claim again Bound", lambda: bound("again"), 30)
    assert claim["spec"]["volumeName"] == pv_name
    pv = await stack.kube.get(f"/api/v1/persistentvolumes/{pv_name}")
    assert pv["status"]["phase"] == "Bound" and pv["spec"]["claimRef"]["uid"] == claim["metadata"]["uid"]
    assert [v["metadata"]["name"] for v in (await stack.kube.get(VOLUMES))["items"]] == [pv_name], (
        "bound to the retained volume, not provisioned anew"
    )
    assert [p["metadata"]["name"] for p in (await stack.kube.get("/api/v1/persistentvolumes"))["items"]] == [pv_name]

    await stack.kube.create(PODS, pod("reader", "node-2", "again", VERIFIER))
    log = await finished(stack, "node-2", "reader")
    assert f"verified {RECORDS}" in log
    await delete_pod(stack, "reader")
