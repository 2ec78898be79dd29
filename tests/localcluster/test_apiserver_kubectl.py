"""The real kubectl binary against the emulated API server, through a written kubeconfig.

This is what `pairvol localcluster up` promises developers: apply (client- and
server-side), get (server-side printing with our printer columns), describe, delete,
get -w, and kubectl's default strict validation reporting our schema errors.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from tests.support.ci import tool

from pairvol.aio import bounded
from pairvol.localcluster.cluster import LocalCluster

KubectlRunner = Callable[..., Coroutine[Any, Any, tuple[int, str, str]]]  # the `kubectl` fixture

MANIFEST = """\
apiVersion: pairvol.io/v1alpha1
kind: ReplicatedVolume
metadata:
  name: vol1
spec:
  size: {size}
  failover:
    mode: {mode}
"""


async def test_apply_get_describe_delete_a_replicated_volume(kubectl: KubectlRunner, api_cluster: LocalCluster) -> None:
    code, out, err = await kubectl("apply", "-f", "-", stdin=MANIFEST.format(size="64Mi", mode="Latest"))
    assert (code, out.strip()) == (0, "replicatedvolume.pairvol.io/vol1 created"), err

    code, out, err = await kubectl("get", "rv")
    assert code == 0, err
    header, row = out.splitlines()
    assert header.split() == ["NAME", "PHASE", "PRIMARY", "SECONDARY", "CHECKPOINT", "SYNC", "AGE"]
    assert row.split()[0] == "vol1"

    code, out, err = await kubectl("get", "rv", "-o", "wide")
    assert code == 0 and out.splitlines()[0].split()[-5:] == ["SIZE", "MODE", "EPOCH", "MESSAGE", "AGE"]
    assert "Latest" in out.splitlines()[1]

    code, out, err = await kubectl("get", "replicatedvolume", "vol1", "-o", "json")
    obj = json.loads(out)
    assert obj["spec"]["checkpoint"]["intervalSeconds"] == 10  # defaulted by the server

    # Re-apply with a changed mode: a client-side apply is a merge patch for CRs.
    code, out, err = await kubectl("apply", "-f", "-", stdin=MANIFEST.format(size="64Mi", mode="Checkpoint"))
    assert (code, out.strip()) == (0, "replicatedvolume.pairvol.io/vol1 configured"), err
    code, out, err = await kubectl(
        "apply", "--server-side", "-f", "-", stdin=MANIFEST.format(size="64Mi", mode="Checkpoint")
    )
    assert code == 0 and "serverside-applied" in out, err

    # The operator's status shows in the printer columns and in describe, with events.
    await _set_status_and_event(api_cluster)
    code, out, err = await kubectl("get", "rv", "vol1")
    assert out.splitlines()[1].split()[:3] == ["vol1", "Replicating", "node-1"]
    code, out, err = await kubectl("describe", "rv", "vol1")
    assert code == 0, err
    assert "Kind:         ReplicatedVolume" in out and "Phase:  Replicating" in out
    assert "Promoted" in out and "node-1 is primary" in out  # the event

    code, out, err = await kubectl("delete", "rv", "vol1")
    assert code == 0 and 'replicatedvolume.pairvol.io "vol1" deleted' in out, err
    code, out, err = await kubectl("get", "rv")
    assert "No resources found" in err


async def _set_status_and_event(cluster: LocalCluster) -> None:
    rtype = cluster.api.resource_type("pairvol.io", "v1alpha1", "replicatedvolumes")
    obj = cluster.api.get_object(rtype, "default", "vol1")
    obj["status"] = {"phase": "Replicating", "primary": {"node": "node-1"}}
    cluster.api.update_object(rtype, "default", "vol1", obj, "status", require_rv=False)
    cluster.api.create_object(
        "",
        "v1",
        "events",
        {
            "metadata": {"generateName": "vol1-"},
            "involvedObject": {
                "apiVersion": "pairvol.io/v1alpha1",
                "kind": "ReplicatedVolume",
                "name": "vol1",
                "namespace": "default",
                "uid": obj["metadata"]["uid"],
            },
            "reason": "Promoted",
            "message": "node-1 is primary",
            "type": "Normal",
            "count": 1,
            "firstTimestamp": obj["metadata"]["creationTimestamp"],
            "lastTimestamp": obj["metadata"]["creationTimestamp"],
            "source": {"component": "pairvol-operator"},
        },
        "default",
    )


async def test_kubectl_reports_schema_errors_and_unknown_fields(kubectl: KubectlRunner) -> None:
    code, _, err = await kubectl("apply", "-f", "-", stdin=MANIFEST.format(size="64Mi", mode="Sometimes"))
    assert code == 1
    assert 'spec.failover.mode: Unsupported value: "Sometimes"' in err

    code, _, err = await kubectl("apply", "-f", "-", stdin=MANIFEST.format(size="12X", mode="Latest"))
    assert code == 1 and "spec.size in body should match" in err

    code, _, err = await kubectl(
        "apply", "-f", "-", stdin=MANIFEST.format(size="64Mi", mode="Latest") + "  bogus: true\n"
    )
    assert code == 1 and 'strict decoding error: unknown field "spec.bogus"' in err

    assert (await kubectl("apply", "-f", "-", stdin=MANIFEST.format(size="64Mi", mode="Latest")))[0] == 0
    code, _, err = await kubectl("patch", "rv", "vol1", "--type=merge", "-p", '{"spec":{"size":"32Mi"}}')
    assert code == 1 and "spec.size may grow but never shrink" in err


async def test_kubectl_get_watch_sees_changes(kubectl: KubectlRunner, api_cluster: LocalCluster) -> None:
    await kubectl("apply", "-f", "-", stdin=MANIFEST.format(size="64Mi", mode="Latest"))
    watcher = asyncio.create_task(kubectl("get", "rv", "-w", "--request-timeout=3s", within=20))
    await asyncio.sleep(1.0)
    code, _, err = await kubectl(
        "patch", "rv", "vol1", "--subresource=status", "--type=merge", "-p", '{"status":{"phase":"Syncing"}}'
    )
    assert code == 0, err
    _, out, _ = await watcher
    lines = [line.split() for line in out.splitlines()]
    assert lines[0][:2] == ["NAME", "PHASE"]
    assert ["vol1", "Syncing"] in [line[:2] for line in lines[1:]]


async def test_kubectl_works_with_builtin_kinds(kubectl: KubectlRunner) -> None:
    code, out, err = await kubectl("get", "nodes")
    assert code == 0, err
    assert [line.split()[:2] for line in out.splitlines()[1:]] == [
        ["node-1", "True"],
        ["node-2", "True"],
        ["node-3", "True"],
    ]
    # Imperative `kubectl create secret` sends protobuf (see test_apiserver_protobuf.py);
    # manifests go as JSON.
    code, out, err = await kubectl("create", "secret", "generic", "made", "--from-literal=key=abc")
    assert code == 0, err
    code, out, err = await kubectl(
        "apply", "-f", "-", stdin="apiVersion: v1\nkind: Secret\nmetadata: {name: psk}\nstringData: {key: abc}\n"
    )
    assert code == 0, err
    code, out, err = await kubectl("label", "secret", "psk", "pairvol.io/volume=vol1")
    assert code == 0, err
    code, out, err = await kubectl("get", "secrets", "-l", "pairvol.io/volume=vol1", "-o", "name")
    assert out.strip() == "secret/psk"
    code, out, err = await kubectl("get", "secret", "psk", "-o", "jsonpath={.data.key}")
    assert out == "YWJj"  # stringData is stored base64-encoded in data
    code, out, err = await kubectl("explain", "rv.spec.failover.mode")
    assert code == 0 and "Checkpoint restarts the volume at the last checkpoint" in out, err
    code, out, err = await kubectl("api-resources")
    assert code == 0 and "replicatedvolumes" in out and "rv" in out
    assert "Warning" not in err, err


async def test_kubectl_scale_writes_replicas_through_the_scale_subresource(kubectl: KubectlRunner) -> None:
    deployment = """
apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
spec:
  replicas: 1
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec: {containers: [{name: c, image: busybox, command: [sleep, "3600"]}]}
"""
    code, _, err = await kubectl("apply", "-f", "-", stdin=deployment)
    assert code == 0, err
    code, out, err = await kubectl("scale", "deployment", "web", "--replicas=3")
    assert (code, out.strip()) == (0, "deployment.apps/web scaled"), err
    code, out, err = await kubectl("get", "deploy", "web", "-o", "jsonpath={.spec.replicas}")
    assert out == "3", err
    code, out, err = await kubectl("get", "--raw", "/apis/apps/v1/namespaces/default/deployments/web/scale")
    scale = json.loads(out)
    assert (scale["kind"], scale["apiVersion"], scale["spec"]) == ("Scale", "autoscaling/v1", {"replicas": 3})
    assert scale["status"]["selector"] == "app=web"
    # a precondition that does not hold changes nothing and says why
    code, out, err = await kubectl("scale", "deployment", "web", "--current-replicas=2", "--replicas=5")
    assert code != 0 and "Expected replicas to be 2, was 3" in err, (out, err)
    code, out, err = await kubectl("scale", "deployment", "web", "--replicas=0")
    assert code == 0, err
    code, out, err = await kubectl("get", "deploy", "web", "-o", "jsonpath={.spec.replicas}")
    assert out == "0"


async def test_kubectl_logs_reads_the_pod_log_source(
    kubectl: KubectlRunner, api_cluster: LocalCluster, tmp_path: Path
) -> None:
    log = tmp_path / "agent.log"
    await asyncio.to_thread(log.write_text, "starting qsd\nreplica ready\n")
    api_cluster.api.log_source = lambda pod: log if pod["metadata"]["name"] == "agent" else None
    pod = {"metadata": {"name": "agent"}, "spec": {"nodeName": "node-1", "containers": [{"name": "a", "image": "x"}]}}
    api_cluster.api.create_object("", "v1", "pods", pod, "default")

    code, out, err = await kubectl("logs", "agent")
    assert (code, out) == (0, "starting qsd\nreplica ready\n"), err
    code, out, err = await kubectl("logs", "agent", "--tail", "1")
    assert out == "replica ready\n"

    follower = asyncio.create_task(kubectl("logs", "-f", "agent", within=20))
    await asyncio.sleep(1.0)
    await asyncio.to_thread(_append, log, "checkpoint 1\n")
    await asyncio.sleep(1.0)
    pods = api_cluster.api.resource_type("", "v1", "pods")
    api_cluster.api.delete_object(pods, "default", "agent", {"gracePeriodSeconds": 0})  # the pod is gone
    code, out, err = await follower
    assert out.endswith("replica ready\ncheckpoint 1\n"), (out, err)


def _append(path: Path, text: str) -> None:
    with path.open("a") as fh:
        fh.write(text)


REPO = Path(__file__).resolve().parents[2]


async def test_the_rendered_helm_chart_applies(kubectl: KubectlRunner) -> None:
    repo, helm = REPO, tool("helm")  # .venv/tools first, then PATH; skips locally, fails on CI
    proc = await asyncio.create_subprocess_exec(
        str(helm), "template", "pv", str(repo / "charts" / "pairvol"), "--namespace", "default",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    manifests, helm_err = await bounded(proc.communicate(), 60)
    assert proc.returncode == 0, helm_err.decode()
    code, out, err = await kubectl("apply", "-f", "-", stdin=manifests.decode())
    assert code == 0, err
    assert "deployment.apps/pv-pairvol-operator created" in out
    assert "kopfpeering.kopf.dev/pairvol created" in out
    code, out, err = await kubectl("get", "clusterroles,roles,networkpolicies,pdb", "-o", "name")
    assert code == 0 and "clusterrole.rbac.authorization.k8s.io/pv-pairvol-operator" in out, err


async def test_kubectl_wait_for_status_condition_and_deletion(kubectl: KubectlRunner) -> None:
    # kubectl wait uses a streaming list (sendInitialEvents + the initial-events-end bookmark).
    await kubectl("apply", "-f", "-", stdin=MANIFEST.format(size="64Mi", mode="Latest"))
    waiter = asyncio.create_task(
        kubectl("wait", "--for=jsonpath={.status.phase}=Replicating", "rv/vol1", "--timeout=15s", within=20)
    )
    await asyncio.sleep(1.0)
    status = {
        "phase": "Replicating",
        "conditions": [{"type": "Ready", "status": "True", "reason": "Synced", "message": "ok",
                        "lastTransitionTime": "2024-01-01T00:00:00Z"}],
    }  # fmt: skip
    patch = json.dumps({"status": status})
    code, _, err = await kubectl("patch", "rv", "vol1", "--subresource=status", "--type=merge", "-p", patch)
    assert code == 0, err
    code, out, err = await waiter
    assert (code, out.strip()) == (0, "replicatedvolume.pairvol.io/vol1 condition met"), err
    code, out, err = await kubectl("wait", "--for=condition=Ready", "rv/vol1", "--timeout=5s")
    assert code == 0, err
    code, _, err = await kubectl("delete", "rv", "vol1", "--wait=false")
    code, out, err = await kubectl("wait", "--for=delete", "rv/vol1", "--timeout=5s")
    assert code == 0, err


async def test_the_examples_apply(kubectl: KubectlRunner) -> None:
    code, out, err = await kubectl("apply", "-f", str(REPO / "examples"))
    assert code == 0, err
    assert "replicatedvolume.pairvol.io/basic created" in out


STORAGE = """\
apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata:
  name: fast
provisioner: pairvol.io
parameters:
  csi.storage.k8s.io/fstype: xfs
---
apiVersion: storage.k8s.io/v1
kind: CSIDriver
metadata:
  name: pairvol.io
spec:
  attachRequired: false
---
apiVersion: v1
kind: PersistentVolumeClaim
metadata:
  name: data
spec:
  storageClassName: fast
  accessModes: [ReadWriteOnce]
  resources:
    requests:
      storage: 1Gi
"""


async def test_storage_kinds_apply_get_and_their_status(kubectl: KubectlRunner, api_cluster: LocalCluster) -> None:
    code, out, err = await kubectl("apply", "-f", "-", stdin=STORAGE)
    assert code == 0, err
    assert out.split("\n")[:3] == [
        "storageclass.storage.k8s.io/fast created",
        "csidriver.storage.k8s.io/pairvol.io created",
        "persistentvolumeclaim/data created",
    ]
    code, out, err = await kubectl("get", "sc")
    assert out.splitlines()[1].split()[:4] == ["fast", "pairvol.io", "Delete", "Immediate"], out  # server defaults
    code, out, err = await kubectl("get", "pvc", "data")
    assert out.splitlines()[1].split()[:2] == ["data", "Pending"], out  # a new claim waits for its volume

    # the provisioner's PV and the binding, through the status subresource
    rtype = api_cluster.api.resource_type("", "v1", "persistentvolumes")
    api_cluster.api.create_object(
        "",
        "v1",
        "persistentvolumes",
        {
            "apiVersion": "v1",
            "kind": "PersistentVolume",
            "metadata": {"name": "pv-1"},
            "spec": {
                "capacity": {"storage": "1Gi"},
                "accessModes": ["ReadWriteOnce"],
                "storageClassName": "fast",
                "csi": {"driver": "pairvol.io", "volumeHandle": "default/pv-1"},
            },
        },
    )
    pv = api_cluster.api.get_object(rtype, "", "pv-1")
    assert pv["status"] == {"phase": "Available"} and pv["spec"]["persistentVolumeReclaimPolicy"] == "Retain"
    code, out, err = await kubectl("patch", "pv", "pv-1", "--subresource=status", "--type=merge",
                                   "-p", '{"status": {"phase": "Bound"}}')  # fmt: skip
    assert code == 0, err
    code, out, err = await kubectl("get", "pv")
    assert out.splitlines()[1].split()[:4] == ["pv-1", "1Gi", "Retain", "Bound"], out
    code, out, err = await kubectl("delete", "pvc", "data")
    assert code == 0 and 'persistentvolumeclaim "data" deleted' in out, err
