"""The local cluster's controllers, specified by what a user sees with the real kubectl.

Deployments roll out and scale, Jobs retry and complete or fail, DaemonSets put a pod on
every matching node, StatefulSets create ordered pods, and deleting an owner deletes
what it owned. Pods run as real processes on simulated nodes (root, network namespaces).
"""

from __future__ import annotations

import asyncio
import json
import os
import textwrap
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from tests.support.ci import tool

from pairvol.aio import bounded
from pairvol.localcluster.cluster import LocalCluster
from pairvol.localcluster.kubelet import NodeSimulator

pytestmark = [
    pytest.mark.netns,
    pytest.mark.timeout(120),
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
]

NODES = ["node-1", "node-2", "node-3"]
Kubectl = Callable[..., Awaitable[str]]


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[LocalCluster]:
    async with (
        LocalCluster(nodes=0, load_crds=False) as c,
        NodeSimulator(
            c.url,
            nodes=NODES,
            root=tmp_path / f"nodes-{os.getpid()}",
            status_interval=0.3,
            node_monitor_grace=1.5,
            backoff_base=0.2,
            config_retry=0.3,
        ),
    ):
        yield c


@pytest.fixture
def kubectl(cluster: LocalCluster, tmp_path: Path) -> Kubectl:
    """``await kubectl("get", "pods")`` -> stdout; fails the test on a non-zero exit."""
    binary = tool("kubectl")

    async def run(*args: str, stdin: str | None = None, within: float = 60, check: bool = True) -> str:
        env = {**os.environ, "KUBECONFIG": str(cluster.kubeconfig_path), "KUBECACHEDIR": str(tmp_path / "kc")}
        proc = await asyncio.create_subprocess_exec(
            binary, *args, env=env,
            stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        try:
            out, err = await bounded(proc.communicate(stdin.encode() if stdin else None), within)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        if check:
            assert proc.returncode == 0, f"kubectl {' '.join(args)}: {err.decode()}"
        return out.decode()

    return run


async def get(kubectl: Kubectl, *args: str) -> Any:
    return json.loads(await kubectl("get", *args, "-o", "json"))


async def eventually(check: Callable[[], Awaitable[Any]], within: float = 30.0) -> Any:
    deadline = time.monotonic() + within
    last: Any = None
    while time.monotonic() < deadline:
        last = await check()
        if last:
            return last
        await asyncio.sleep(0.2)
    raise AssertionError(f"not within {within}s; last: {last!r}")


def deployment(replicas: int, version: str) -> str:
    return textwrap.dedent(f"""\
        apiVersion: apps/v1
        kind: Deployment
        metadata: {{name: web}}
        spec:
          replicas: {replicas}
          selector: {{matchLabels: {{app: web}}}}
          strategy: {{type: RollingUpdate, rollingUpdate: {{maxSurge: 1, maxUnavailable: 0}}}}
          template:
            metadata: {{labels: {{app: web}}}}
            spec:
              containers:
              - name: main
                image: busybox
                command: [sleep, "600"]
                env: [{{name: VERSION, value: "{version}"}}]
        """)


def ready_pods(cluster: LocalCluster, label: str) -> int:
    pods = cluster.api.list_objects(cluster.api.resource_type("", "v1", "pods"), "default")
    return sum(
        1
        for p in pods
        if (p["metadata"].get("labels") or {}).get("app") == label
        and not p["metadata"].get("deletionTimestamp")
        and any(c["type"] == "Ready" and c["status"] == "True" for c in p.get("status", {}).get("conditions", []))
    )


async def test_a_deployment_rolls_out_scales_and_updates_without_losing_availability(
    cluster: LocalCluster, kubectl: Kubectl
) -> None:
    await kubectl("apply", "-f", "-", stdin=deployment(3, "1"))
    out = await kubectl("rollout", "status", "deployment/web", "--timeout=60s")
    assert 'deployment "web" successfully rolled out' in out
    pods = (await get(kubectl, "pods", "-l", "app=web"))["items"]
    assert len(pods) == 3 and {p["status"]["phase"] for p in pods} == {"Running"}
    assert {p["spec"]["nodeName"] for p in pods} == set(NODES)  # spread over the nodes
    assert all(p["metadata"]["ownerReferences"][0]["kind"] == "ReplicaSet" for p in pods)

    await kubectl("patch", "deployment", "web", "--type=merge", "-p", '{"spec":{"replicas":4}}')
    await kubectl("rollout", "status", "deployment/web", "--timeout=60s")
    assert len((await get(kubectl, "pods", "-l", "app=web"))["items"]) == 4

    # A template change rolls: with maxUnavailable 0, 4 pods stay Ready throughout.
    lowest = 4
    done = asyncio.Event()

    async def watch_availability() -> None:
        nonlocal lowest
        while not done.is_set():
            lowest = min(lowest, ready_pods(cluster, "web"))
            await asyncio.sleep(0.02)

    watcher = asyncio.create_task(watch_availability())
    await kubectl("apply", "-f", "-", stdin=deployment(4, "2"))
    out = await kubectl("rollout", "status", "deployment/web", "--timeout=90s", within=100)
    done.set()
    await watcher
    assert 'deployment "web" successfully rolled out' in out
    assert lowest == 4
    rs = (await get(kubectl, "replicasets", "-l", "app=web"))["items"]
    by_replicas = sorted(
        (r["spec"]["replicas"], r["metadata"]["annotations"]["deployment.kubernetes.io/revision"]) for r in rs
    )
    assert by_replicas == [(0, "1"), (4, "2")]
    pods = (await get(kubectl, "pods", "-l", "app=web"))["items"]
    assert len(pods) == 4
    assert all(p["spec"]["containers"][0]["env"] == [{"name": "VERSION", "value": "2"}] for p in pods)
    status = (await get(kubectl, "deployment", "web"))["status"]
    assert (status["replicas"], status["updatedReplicas"], status["availableReplicas"]) == (4, 4, 4)


async def all_gone(kubectl: Kubectl, kinds: str, selector: str, within: float = 20) -> str:
    """What is still listed of ``kinds`` with ``selector`` once nothing is, or ``within``
    seconds passed (deletions that the garbage collector and the kubelet finish after kubectl
    returned)."""
    deadline = time.monotonic() + within
    for _ in range(int(within / 0.2) + 1):
        left = await kubectl("get", kinds, "-l", selector, "-o", "name")
        if not left or time.monotonic() >= deadline:
            break
        await asyncio.sleep(0.2)
    return left


@pytest.mark.parametrize("cascade", ["background", "foreground"])
async def test_deleting_a_deployment_deletes_its_replicasets_and_pods(
    cluster: LocalCluster, kubectl: Kubectl, cascade: str
) -> None:
    await kubectl("apply", "-f", "-", stdin=deployment(2, "1"))
    await kubectl("rollout", "status", "deployment/web", "--timeout=60s")
    await kubectl("delete", "deployment", "web", f"--cascade={cascade}")
    # background: kubectl returns once the Deployment is gone; the garbage collector then
    # deletes its dependents, and a pod goes once its node has stopped it (foreground: the
    # dependents are gone before the Deployment, the pods stopping)
    assert await all_gone(kubectl, "deployments,replicasets,pods", "app=web") == ""


async def test_an_orphaning_delete_leaves_the_dependents_without_their_owner(
    cluster: LocalCluster, kubectl: Kubectl
) -> None:
    await kubectl("apply", "-f", "-", stdin=deployment(2, "1"))
    await kubectl("rollout", "status", "deployment/web", "--timeout=60s")
    await kubectl("delete", "deployment", "web", "--cascade=orphan")
    (rs,) = (await get(kubectl, "replicasets", "-l", "app=web"))["items"]
    assert "ownerReferences" not in rs["metadata"]
    pods = (await get(kubectl, "pods", "-l", "app=web"))["items"]
    assert [p["metadata"]["ownerReferences"][0]["name"] for p in pods] == [rs["metadata"]["name"]] * 2
    await kubectl("delete", "replicaset", rs["metadata"]["name"])  # the pods' owner still collects them
    assert await all_gone(kubectl, "pods", "app=web") == ""


def job(name: str, script: str, policy: str, backoff_limit: int) -> str:
    return json.dumps({
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": {
            "backoffLimit": backoff_limit,
            "template": {"spec": {
                "restartPolicy": policy,
                "containers": [{"name": "main", "image": "busybox", "command": ["sh", "-c", script]}],
            }},
        },
    })  # fmt: skip


@pytest.mark.parametrize("policy", ["Never", "OnFailure"])
async def test_a_job_is_retried_until_it_succeeds(
    cluster: LocalCluster, kubectl: Kubectl, tmp_path: Path, policy: str
) -> None:
    marker = tmp_path / "second-try"
    script = f"if [ -e {marker} ]; then echo done; exit 0; fi; touch {marker}; exit 1"
    await kubectl("apply", "-f", "-", stdin=job("once", script, policy, 3))
    out = await kubectl("wait", "--for=condition=complete", "job/once", "--timeout=60s", within=70)
    assert "condition met" in out
    status = (await get(kubectl, "job", "once"))["status"]
    assert status["succeeded"] == 1 and "active" not in status
    pods = (await get(kubectl, "pods", "-l", "job-name=once"))["items"]
    if policy == "Never":  # a new pod per attempt
        assert sorted(p["status"]["phase"] for p in pods) == ["Failed", "Succeeded"]
        assert status["failed"] == 1
    else:  # the same pod, its container restarted
        assert [p["status"]["phase"] for p in pods] == ["Succeeded"]
        assert pods[0]["status"]["containerStatuses"][0]["restartCount"] == 1


async def test_a_job_fails_once_its_backoff_limit_is_exceeded(cluster: LocalCluster, kubectl: Kubectl) -> None:
    await kubectl("apply", "-f", "-", stdin=job("never-works", "exit 3", "Never", 1))
    out = await kubectl("wait", "--for=condition=failed", "job/never-works", "--timeout=60s", within=70)
    assert "condition met" in out
    job_obj = await get(kubectl, "job", "never-works")
    failed = next(c for c in job_obj["status"]["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "BackoffLimitExceeded"
    assert job_obj["status"]["failed"] == 2  # the first try and one retry (backoffLimit 1)
    pods = (await get(kubectl, "pods", "-l", "job-name=never-works"))["items"]
    assert [p["status"]["phase"] for p in pods] == ["Failed", "Failed"]


async def test_a_finished_job_with_a_ttl_is_deleted_with_its_pods(cluster: LocalCluster, kubectl: Kubectl) -> None:
    manifest = json.loads(job("short-lived", "exit 0", "Never", 0))
    manifest["spec"]["ttlSecondsAfterFinished"] = 1
    await kubectl("apply", "-f", "-", stdin=json.dumps(manifest))
    await kubectl("wait", "--for=delete", "job/short-lived", "--timeout=30s", within=40)
    assert await all_gone(kubectl, "pods", "job-name=short-lived") == ""


DAEMONSET = """\
apiVersion: apps/v1
kind: DaemonSet
metadata: {name: agent}
spec:
  selector: {matchLabels: {app: agent}}
  template:
    metadata: {labels: {app: agent}}
    spec:
      %s
      containers: [{name: main, image: busybox, command: [sleep, "600"]}]
"""


async def test_a_daemonset_runs_one_pod_on_every_matching_node(cluster: LocalCluster, kubectl: Kubectl) -> None:
    await kubectl("apply", "-f", "-", stdin=DAEMONSET % "nodeSelector: {}")
    out = await kubectl("rollout", "status", "daemonset/agent", "--timeout=60s")
    assert "successfully rolled out" in out
    pods = (await get(kubectl, "pods", "-l", "app=agent"))["items"]
    assert sorted(p["spec"]["nodeName"] for p in pods) == NODES

    # Restricted to labelled nodes: pods leave the others, follow the label.
    await kubectl("apply", "-f", "-", stdin=DAEMONSET % "nodeSelector: {disk: ssd}")

    async def placement() -> list[str]:
        pods = (await get(kubectl, "pods", "-l", "app=agent"))["items"]
        return sorted(p["spec"]["nodeName"] for p in pods if not p["metadata"].get("deletionTimestamp"))

    await eventually(lambda: _equals(placement(), []))
    await kubectl("label", "node", "node-2", "disk=ssd")
    await eventually(lambda: _equals(placement(), ["node-2"]))
    status = (await get(kubectl, "daemonset", "agent"))["status"]
    assert status["desiredNumberScheduled"] == 1


async def _equals(value: Awaitable[Any], expected: Any) -> bool:
    return (await value) == expected


STATEFULSET = """\
apiVersion: apps/v1
kind: StatefulSet
metadata: {name: db}
spec:
  serviceName: db
  replicas: %d
  selector: {matchLabels: {app: db}}
  template:
    metadata: {labels: {app: db}}
    spec:
      containers: [{name: main, image: busybox, command: [sleep, "600"]}]
"""


async def test_a_statefulset_creates_ordered_pods_one_after_the_other(cluster: LocalCluster, kubectl: Kubectl) -> None:
    await kubectl("apply", "-f", "-", stdin=STATEFULSET % 3)
    out = await kubectl("rollout", "status", "statefulset/db", "--timeout=60s")
    assert "roll out complete" in out or "successfully rolled out" in out, out
    pods = {p["metadata"]["name"]: p for p in (await get(kubectl, "pods", "-l", "app=db"))["items"]}
    assert sorted(pods) == ["db-0", "db-1", "db-2"]
    for before, after in (("db-0", "db-1"), ("db-1", "db-2")):  # OrderedReady: after its predecessor was Ready
        ready = next(c for c in pods[before]["status"]["conditions"] if c["type"] == "Ready")
        assert pods[after]["metadata"]["creationTimestamp"] >= ready["lastTransitionTime"]
    assert pods["db-1"]["spec"]["hostname"] == "db-1" and pods["db-1"]["spec"]["subdomain"] == "db"

    await kubectl("apply", "-f", "-", stdin=STATEFULSET % 1)

    async def names() -> list[str]:
        return sorted(p["metadata"]["name"] for p in (await get(kubectl, "pods", "-l", "app=db"))["items"])

    await eventually(lambda: _equals(names(), ["db-0"]))


async def test_a_pod_that_fits_no_node_stays_pending_and_says_why(cluster: LocalCluster, kubectl: Kubectl) -> None:
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "picky"},
        "spec": {"nodeSelector": {"gpu": "yes"}, "containers": [{"name": "m", "image": "x", "command": ["true"]}]},
    }
    await kubectl("apply", "-f", "-", stdin=json.dumps(pod))

    async def unschedulable() -> Any:
        obj = await get(kubectl, "pod", "picky")
        return next((c for c in obj["status"].get("conditions", []) if c["type"] == "PodScheduled"), None)

    cond = await eventually(unschedulable)
    assert (cond["status"], cond["reason"]) == ("False", "Unschedulable")
    assert cond["message"] == "0/3 nodes are available: 3 node(s) didn't match Pod's node affinity/selector."
    events = await kubectl("get", "events", "--field-selector", "involvedObject.name=picky", "-o", "json")
    assert any(e["reason"] == "FailedScheduling" for e in json.loads(events)["items"])
    await kubectl("label", "node", "node-3", "gpu=yes")
    bound = await eventually(lambda: _node_of(kubectl, "picky"))
    assert bound == "node-3"


async def _node_of(kubectl: Kubectl, name: str) -> str | None:
    node = (await get(kubectl, "pod", name))["spec"].get("nodeName")
    return str(node) if node else None


async def test_a_deployment_rollout_can_be_undone(cluster: LocalCluster, kubectl: Kubectl) -> None:
    await kubectl("apply", "-f", "-", stdin=deployment(2, "1"))
    await kubectl("rollout", "status", "deployment/web", "--timeout=60s")
    await kubectl("apply", "-f", "-", stdin=deployment(2, "2"))
    await kubectl("rollout", "status", "deployment/web", "--timeout=60s")
    await kubectl("rollout", "undo", "deployment/web")
    await kubectl("rollout", "status", "deployment/web", "--timeout=60s")
    dep = await get(kubectl, "deployment", "web")
    assert dep["metadata"]["annotations"]["deployment.kubernetes.io/revision"] == "3"
    pods = (await get(kubectl, "pods", "-l", "app=web"))["items"]
    assert [p["spec"]["containers"][0]["env"][0]["value"] for p in pods] == ["1", "1"]
    history = await kubectl("rollout", "history", "deployment/web")
    assert [line.split()[0] for line in history.splitlines()[2:] if line.strip()] == ["2", "3"]


async def test_daemonset_and_statefulset_roll_to_a_new_template(cluster: LocalCluster, kubectl: Kubectl) -> None:
    await kubectl("apply", "-f", "-", stdin=DAEMONSET % "nodeSelector: {}")
    await kubectl("apply", "-f", "-", stdin=STATEFULSET % 2)
    await kubectl("rollout", "status", "daemonset/agent", "--timeout=60s")
    await kubectl("rollout", "status", "statefulset/db", "--timeout=60s")
    await kubectl("set", "env", "daemonset/agent", "statefulset/db", "VERSION=2")
    await kubectl("rollout", "status", "daemonset/agent", "--timeout=60s")
    await kubectl("rollout", "status", "statefulset/db", "--timeout=60s")
    for app, count in (("agent", 3), ("db", 2)):
        pods = (await get(kubectl, "pods", "-l", f"app={app}"))["items"]
        live = [p for p in pods if not p["metadata"].get("deletionTimestamp")]
        assert len(live) == count
        assert all(p["spec"]["containers"][0].get("env") == [{"name": "VERSION", "value": "2"}] for p in live)
    sts = (await get(kubectl, "statefulset", "db"))["status"]
    assert sts["currentRevision"] == sts["updateRevision"] and sts["updatedReplicas"] == 2
