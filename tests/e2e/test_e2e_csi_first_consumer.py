"""A WaitForFirstConsumer claim's volume is made where its first pod runs, on the local cluster.

The claim waits, unprovisioned, until a pod uses it. The scheduler chooses the pod's node
and writes it on the claim (``volume.kubernetes.io/selected-node``); the provisioner then
calls CreateVolume preferring that node's topology; the driver makes it the volume's
``preferredPrimaryNode``, and the operator starts the primary there. The pod is bound to
that node once its claim is bound, and writes into the file system through a primary on its
own node.
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
    VOLUMES,
    WRITER,
    claim_of_a_class_like_the_charts,
    csi,
    kubectl,
    pod,
    pod_events,
    pod_log,
    until_writing,
)

from pairvol.localcluster.csi_plugins import LocalCsi
from pairvol.localcluster.demo import Stack

pytestmark = pytest.mark.timeout(150)


async def test_a_wait_for_first_consumer_claim_gets_its_primary_on_the_node_of_its_pod(
    stack: Stack,
    csi: LocalCsi,  # noqa: F811
) -> None:
    await claim_of_a_class_like_the_charts(stack, "data", "pairvol-local", volumeBindingMode="WaitForFirstConsumer")

    async def waiting() -> list[str]:
        return [e for e in await pod_events(stack, "data") if e.startswith("WaitForFirstConsumer")]

    await stack.wait_for("the claim told it waits for its first pod", waiting, 10)
    claim = await stack.kube.get(f"{CLAIMS}/data")
    assert claim["status"]["phase"] == "Pending" and not claim["spec"].get("volumeName")
    assert (await stack.kube.get("/apis/pairvol.io/v1alpha1/namespaces/default/replicatedvolumes"))["items"] == []
    assert (await stack.kube.get("/api/v1/persistentvolumes"))["items"] == []

    # node-3: where the operator would not put a primary by itself (least loaded, then by name)
    writer = pod("writer", "", "data", WRITER)
    del writer["spec"]["nodeName"]
    writer["spec"]["nodeSelector"] = {"kubernetes.io/hostname": "node-3"}
    await stack.kube.create(PODS, writer)

    async def bound() -> dict[str, Any] | None:
        got = await stack.kube.get(f"{CLAIMS}/data")
        return got if (got.get("status") or {}).get("phase") == "Bound" else None

    claim = await stack.wait_for("claim data Bound", bound, 60)
    assert claim["metadata"]["annotations"]["volume.kubernetes.io/selected-node"] == "node-3"
    pv_name = claim["spec"]["volumeName"]
    rv = await stack.volume(pv_name)
    assert rv["spec"]["preferredPrimaryNode"] == "node-3"
    assert "nodes" not in rv["spec"], "a preference, not a restriction of the replicas"
    status = await stack.status(pv_name)
    assert status["primary"]["node"] == "node-3", status

    async def written() -> bool:
        return f"written {RECORDS}" in await pod_log(stack, "node-3", "writer")

    await until_writing(stack, "writer", "the writer's records fsynced", written, 30)
    placed = await stack.kube.get(f"{PODS}/writer")
    assert placed["spec"]["nodeName"] == "node-3"


async def test_a_wait_for_first_consumer_claim_whose_selected_node_dies_is_provisioned_and_used_elsewhere(
    stack: Stack,
    csi: LocalCsi,  # noqa: F811
) -> None:
    """The node chosen for the claim's first pod dies while the claim's volume is being made
    there: the volume is made on the nodes that live, the claim is bound, and the pod (not
    bound to a node before its claim is) runs on a node that lives and writes."""
    sc = await stack.kube.get("/apis/storage.k8s.io/v1/storageclasses/pairvol")  # the chart's
    sc["metadata"] = {"name": "pairvol-local"}
    sc["volumeBindingMode"] = "WaitForFirstConsumer"
    await stack.kube.create("/apis/storage.k8s.io/v1/storageclasses", sc)
    claim_yaml = CLAIM.format(name="data", mode="Filesystem", size="64Mi").replace(
        "storageClassName: pairvol", "storageClassName: pairvol-local"
    )
    code, _, err = await kubectl(stack, "apply", "-f", "-", stdin=claim_yaml)
    assert code == 0, err
    writer = pod("writer", "", "data", WRITER)
    del writer["spec"]["nodeName"]  # the scheduler places it
    await stack.kube.create(PODS, writer)

    async def being_made() -> dict[str, Any] | None:
        volumes = (await stack.kube.get(VOLUMES))["items"]
        return volumes[0] if volumes else None

    rv = await stack.wait_for("the claim's ReplicatedVolume created", being_made, 30, every=0.05)
    doomed = rv["spec"]["preferredPrimaryNode"]
    claim = await stack.kube.get(f"{CLAIMS}/data")
    assert claim["metadata"]["annotations"]["volume.kubernetes.io/selected-node"] == doomed

    async def agent_there() -> bool:
        return any(p["spec"].get("nodeName") == doomed for p in await stack.pods(rv["metadata"]["name"]))

    await stack.wait_for(f"the volume's first agent on {doomed}", agent_there, 30, every=0.05)
    await stack.sim.kill_node(doomed)
    st = await stack.status(rv["metadata"]["name"])
    assert st.get("phase") != "Replicating", f"provisioned before {doomed} was killed: {st}"

    async def bound() -> dict[str, Any] | None:
        got = await stack.kube.get(f"{CLAIMS}/data")
        return got if (got.get("status") or {}).get("phase") == "Bound" else None

    claim = await stack.wait_for("claim data Bound", bound, 60)
    st = await stack.status(claim["spec"]["volumeName"])
    assert doomed not in {st["primary"]["node"], st["secondary"]["node"]}, st

    async def placed() -> str | None:
        got = await stack.kube.get(f"{PODS}/writer")
        return got["spec"].get("nodeName")

    node = await stack.wait_for("the writer scheduled", placed, 30)
    assert node != doomed

    async def written() -> bool:
        return f"written {RECORDS}" in await pod_log(stack, node, "writer")

    await until_writing(stack, "writer", "the writer's records fsynced", written, 30)
