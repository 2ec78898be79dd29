"""The local cluster's scheduler: where a pod without ``spec.nodeName`` goes.

Nodes are plain Ready objects here (no node simulator): scheduling is a decision on the
API objects, so these tests need no root. The chart's own operator Deployment is the
example that matters: its two replicas spread over nodes by preferred anti-affinity.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from tests.localcluster.conftest import KubectlRunner
from tests.support.ci import tool

from pairvol.aio import bounded
from pairvol.localcluster.cluster import LocalCluster

REPO = Path(__file__).resolve().parents[2]


def filler(cluster: LocalCluster, node: str, count: int) -> None:
    """``count`` pods bound to ``node`` (load the scheduler would otherwise avoid)."""
    for i in range(count):
        pod = {"metadata": {"name": f"filler-{node}-{i}", "labels": {"role": "filler"}},
               "spec": {"nodeName": node, "containers": [{"name": "c", "image": "x"}]}}  # fmt: skip
        cluster.api.create_object("", "v1", "pods", pod, "default")


async def pods_by_node(kubectl: KubectlRunner, selector: str, count: int, namespace: str = "default") -> Any:
    for _ in range(100):
        code, out, err = await kubectl("get", "pods", "-n", namespace, "-l", selector, "-o", "json")
        assert code == 0, err
        items = json.loads(out)["items"]
        if len(items) == count and all(p["spec"].get("nodeName") or _pending(p) for p in items):
            return items
        await asyncio.sleep(0.1)
    raise AssertionError(f"{count} pods {selector} not scheduled: {out}")


def _pending(pod: dict[str, Any]) -> bool:
    return any(c["type"] == "PodScheduled" and c["status"] == "False" for c in pod["status"].get("conditions", []))


async def test_the_charts_operator_replicas_go_to_different_nodes(
    api_cluster: LocalCluster, kubectl: KubectlRunner
) -> None:
    # node-1 is empty, node-2 and node-3 busy: by load alone both replicas would go to node-1.
    filler(api_cluster, "node-2", 4)
    filler(api_cluster, "node-3", 5)
    proc = await asyncio.create_subprocess_exec(
        tool("helm"), "template", "pairvol", str(REPO / "charts" / "pairvol"), "--namespace", "default",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    manifests, err = await bounded(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    code, _, err_text = await kubectl("apply", "-f", "-", stdin=manifests.decode())
    assert code == 0, err_text
    pods = await pods_by_node(kubectl, "app.kubernetes.io/component=operator", 2)
    assert sorted(p["spec"]["nodeName"] for p in pods) == ["node-1", "node-2"]
    assert all(p["metadata"]["ownerReferences"][0]["kind"] == "ReplicaSet" for p in pods)


REQUIRED = """\
apiVersion: apps/v1
kind: Deployment
metadata: {name: solo}
spec:
  replicas: 4
  selector: {matchLabels: {app: solo}}
  template:
    metadata: {labels: {app: solo}}
    spec:
      affinity:
        podAntiAffinity:
          requiredDuringSchedulingIgnoredDuringExecution:
          - topologyKey: kubernetes.io/hostname
            labelSelector: {matchLabels: {app: solo}}
      containers: [{name: c, image: x, command: [sleep, "600"]}]
"""


async def test_required_anti_affinity_leaves_the_extra_replica_pending(
    api_cluster: LocalCluster, kubectl: KubectlRunner
) -> None:
    code, _, err = await kubectl("apply", "-f", "-", stdin=REQUIRED)
    assert code == 0, err
    pods = await pods_by_node(kubectl, "app=solo", 4)
    assert sorted(p["spec"].get("nodeName", "-") for p in pods) == ["-", "node-1", "node-2", "node-3"]
    (pending,) = [p for p in pods if not p["spec"].get("nodeName")]
    (cond,) = [c for c in pending["status"]["conditions"] if c["type"] == "PodScheduled"]
    assert cond["message"] == "0/3 nodes are available: 3 node(s) didn't match pod anti-affinity rules."


def claim_object(name: str, storage_class: str) -> dict[str, Any]:
    return {"metadata": {"name": name},
            "spec": {"storageClassName": storage_class, "accessModes": ["ReadWriteOnce"],
                     "resources": {"requests": {"storage": "1Gi"}}}}  # fmt: skip


def claim_pod(name: str, claim: str) -> dict[str, Any]:
    return {"metadata": {"name": name},
            "spec": {"containers": [{"name": "c", "image": "x"}],
                     "volumes": [{"name": "d", "persistentVolumeClaim": {"claimName": claim}}]}}  # fmt: skip


async def test_a_pods_claims_decide_when_and_where_it_is_scheduled(
    api_cluster: LocalCluster, kubectl: KubectlRunner
) -> None:
    api = api_cluster.api
    for name, mode in (("now", "Immediate"), ("later", "WaitForFirstConsumer")):
        sc = {"metadata": {"name": name}, "provisioner": "pairvol.io", "volumeBindingMode": mode}
        api.create_object("storage.k8s.io", "v1", "storageclasses", sc, None)
    filler(api_cluster, "node-2", 2)
    filler(api_cluster, "node-3", 3)
    api.create_object("", "v1", "persistentvolumeclaims", claim_object("unbound", "now"), "default")
    api.create_object("", "v1", "persistentvolumeclaims", claim_object("delayed", "later"), "default")
    for pod, claim in (("no-claim", "missing"), ("immediate", "unbound"), ("consumer", "delayed")):
        api.create_object("", "v1", "pods", claim_pod(pod, claim), "default")

    async def get(kind: str, name: str) -> dict[str, Any]:
        code, out, err = await kubectl("get", kind, name, "-o", "json")
        assert code == 0, err
        result: dict[str, Any] = json.loads(out)
        return result

    async def scheduling_message(pod: str) -> str:
        for _ in range(100):
            conditions = (await get("pod", pod))["status"].get("conditions") or []
            found = [c.get("message", "") for c in conditions if c["type"] == "PodScheduled"]
            if found:
                return str(found[0])
            await asyncio.sleep(0.1)
        raise AssertionError(f"pod {pod} was never considered")

    # a claim that does not exist, or an unbound one of an Immediate class, keeps the pod Pending
    assert await scheduling_message("no-claim") == '0/3 nodes are available: persistentvolumeclaim "missing" not found.'
    assert await scheduling_message("immediate") == (
        "0/3 nodes are available: pod has unbound immediate PersistentVolumeClaims."
    )
    # a WaitForFirstConsumer claim is told the node chosen for its first pod, which waits for it
    for _ in range(100):
        claim = await get("pvc", "delayed")
        if "volume.kubernetes.io/selected-node" in (claim["metadata"].get("annotations") or {}):
            break
        await asyncio.sleep(0.1)
    assert claim["metadata"]["annotations"]["volume.kubernetes.io/selected-node"] == "node-1"  # the least loaded
    assert not (await get("pod", "consumer"))["spec"].get("nodeName")
    filler(api_cluster, "node-1", 4)  # node-1 busiest now: the pod still goes where its volume was made for
    patch = json.dumps({"status": {"phase": "Bound"}})
    code, _, err = await kubectl("patch", "pvc", "delayed", "--subresource=status", "--type=merge", "-p", patch)
    assert code == 0, err
    pods = await pods_by_node(kubectl, "!role", 3)
    assert {p["metadata"]["name"]: p["spec"].get("nodeName") for p in pods} == {
        "no-claim": None, "immediate": None, "consumer": "node-1"
    }
