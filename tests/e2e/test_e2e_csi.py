"""PersistentVolumeClaims on the local cluster, end to end, through the CSI driver.

The story a user would see: a StorageClass and a claim applied with the real kubectl; the
local cluster's provisioner calls the controller plugin's CreateVolume, which creates a
ReplicatedVolume that the real operator brings to Replicating on real agents; the claim is
Bound to a PV. A pod on one node writes checksummed, fsynced records into the file system
that its node's kubelet staged and published through the node plugin's gRPC socket. The pod
is deleted (its node unpublishes and unstages the volume), and a pod on another node finds
every record intact. Deleting the claim deletes the PV and the ReplicatedVolume (the
StorageClass's reclaimPolicy Delete).

The node and controller plugins run as processes of the local cluster with the privileges
of the chart's containers (pairvol.localcluster.csi_plugins), the controller with a token of
the chart's controller ServiceAccount.
"""

from __future__ import annotations

import asyncio
import json
import os
import textwrap
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any

import pytest
from tests.e2e.conftest import render_chart
from tests.support.ci import tool

from pairvol.aio import bounded
from pairvol.localcluster.csi_plugins import LocalCsi, mounts_under
from pairvol.localcluster.demo import Stack

pytestmark = pytest.mark.timeout(150)

RECORDS = 200


#: The pod's event when mount refuses a corrupt file system (it must never happen).
CORRUPT = "probably corrupted filesystem"
PODS = "/api/v1/namespaces/default/pods"

WRITER = textwrap.dedent(
    """
    import hashlib, os, sys, time
    path = "/data/log"
    with open(path, "wb") as f:
        for seq in range(int(sys.argv[1])):
            body = f"record {seq} from {os.uname().nodename}".encode()
            f.write(hashlib.sha256(body).hexdigest().encode() + b" " + body + b"\\n")
            f.flush()
            os.fsync(f.fileno())
    fd = os.open("/data", os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
    print("written", sys.argv[1], flush=True)
    while True:
        time.sleep(1)
    """
)

VERIFIER = textwrap.dedent(
    """
    import hashlib, sys
    lines = open("/data/log", "rb").read().splitlines()
    for seq, line in enumerate(lines):
        digest, body = line.split(b" ", 1)
        assert hashlib.sha256(body).hexdigest().encode() == digest, f"record {seq} corrupt: {line!r}"
        assert body.startswith(f"record {seq} ".encode()), f"record {seq} out of order: {line!r}"
    assert len(lines) == int(sys.argv[1]), f"{len(lines)} records, expected {sys.argv[1]}"
    print("verified", len(lines), flush=True)
    """
)


BLOCK_WRITER = textwrap.dedent(
    """
    import hashlib, os, sys, time
    fd = os.open("/var/run/pairvol-disk", os.O_RDWR)
    for seq in range(int(sys.argv[1])):
        body = f"block {seq}".encode()
        record = (hashlib.sha256(body).hexdigest().encode() + b" " + body).ljust(4096, b"\\0")
        os.pwrite(fd, record, seq * 4096)
    os.fsync(fd)
    os.close(fd)
    print("written", sys.argv[1], flush=True)
    while True:
        time.sleep(1)
    """
)

BLOCK_VERIFIER = textwrap.dedent(
    """
    import hashlib, os, sys
    fd = os.open("/var/run/pairvol-disk", os.O_RDONLY)
    for seq in range(int(sys.argv[1])):
        digest, _, body = os.pread(fd, 4096, seq * 4096).rstrip(b"\\0").partition(b" ")
        if hashlib.sha256(body).hexdigest().encode() != digest or body != f"block {seq}".encode():
            sys.exit(f"block {seq} holds {body[:40]!r}")
    print("verified", sys.argv[1], flush=True)
    """
)

# Writes records until stopped, each fsynced before it is reported ("acked N"): what was
# acked must survive anything the volume goes through.
STREAM_WRITER = textwrap.dedent(
    """
    import hashlib, os, signal, sys, time
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with open("/data/log", "ab") as f:
        seq = 0
        while True:
            body = f"record {seq} from {os.uname().nodename}".encode()
            f.write(hashlib.sha256(body).hexdigest().encode() + b" " + body + b"\\n")
            f.flush()
            os.fsync(f.fileno())
            print("acked", seq, flush=True)
            seq += 1
            time.sleep(0.02)
    """
)

# Every complete record intact and in order, and at least the acknowledged ones there.
PREFIX_VERIFIER = textwrap.dedent(
    """
    import hashlib, sys
    data = open("/data/log", "rb").read()
    lines = data.split(b"\\n")[:-1]  # a record is complete with its newline
    for seq, line in enumerate(lines):
        digest, body = line.split(b" ", 1)
        assert hashlib.sha256(body).hexdigest().encode() == digest, f"record {seq} corrupt: {line!r}"
        assert body.startswith(f"record {seq} ".encode()), f"record {seq} out of order: {line!r}"
    assert len(lines) >= int(sys.argv[1]), f"{len(lines)} records, {sys.argv[1]} were acknowledged"
    print("verified", len(lines), flush=True)
    """
)


def pod(name: str, node: str, claim: str, script: str, *args: str, block: bool = False) -> dict[str, Any]:
    container: dict[str, Any] = {
        "name": "app",
        "image": "python:3.12-slim",
        "command": ["python3", "-c", script, *(args or (str(RECORDS),))],
    }
    if block:
        container["volumeDevices"] = [{"name": "data", "devicePath": "/var/run/pairvol-disk"}]
    else:
        container["volumeMounts"] = [{"name": "data", "mountPath": "/data"}]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "nodeName": node,
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 1,
            "containers": [container],
            "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": claim}}],
        },
    }


CLAIM = """\
apiVersion: v1
kind: PersistentVolumeClaim
metadata:
  name: {name}
  namespace: default
spec:
  storageClassName: pairvol
  accessModes: [ReadWriteOnce]
  volumeMode: {mode}
  resources:
    requests:
      storage: {size}
"""
# ext4 on a volume of 512 MiB or more has 4 KiB blocks (the loop device's direct I/O once
# misdirected writes here, and 1 KiB blocks showed it most: docs/csi.md, "The loop device")
FS_SIZE = "512Mi"
CLAIMS = "/api/v1/namespaces/default/persistentvolumeclaims"
VOLUMES = "/apis/pairvol.io/v1alpha1/namespaces/default/replicatedvolumes"


async def copy_export(stack: Stack, status: dict[str, Any], image: Path) -> Path:
    """The whole volume, copied through its primary's export (as ``status`` names it) into
    the file ``image``."""
    socket = stack.socket_path(status)
    proc = await asyncio.create_subprocess_exec(  # relative: the socket's path is longer than a unix address
        "qemu-img", "convert", "-f", "raw", "-O", "raw", f"nbd+unix:///volume?socket={socket.name}", str(image),
        cwd=socket.parent, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await proc.communicate()
    assert proc.returncode == 0, out.decode()
    return image


async def claim_of_a_class_like_the_charts(stack: Stack, name: str, storage_class: str, **changes: Any) -> None:
    """A StorageClass ``storage_class`` made from the chart's ``pairvol`` with ``changes``,
    and a Filesystem claim ``name`` of it (not waited for)."""
    sc = await stack.kube.get("/apis/storage.k8s.io/v1/storageclasses/pairvol")
    sc["metadata"] = {"name": storage_class}
    sc.update(changes)
    await stack.kube.create("/apis/storage.k8s.io/v1/storageclasses", sc)
    claim_yaml = CLAIM.format(name=name, mode="Filesystem", size=FS_SIZE).replace(
        "storageClassName: pairvol", f"storageClassName: {storage_class}"
    )
    code, _, err = await kubectl(stack, "apply", "-f", "-", stdin=claim_yaml)
    assert code == 0, err


@pytest.fixture
async def csi(stack: Stack) -> AsyncIterator[LocalCsi]:
    """The chart's CSI objects: its controller's and node plugin's ServiceAccounts and RBAC
    applied (the plugins run with their tokens), the CSIDriver and the StorageClass applied
    with kubectl; then the driver on every simulated node."""
    chart = render_chart("default", "csi.enabled=true", "csi.storageClass.create=true")
    csi_docs = [
        d
        for d in chart
        if "csi" in str((d.get("metadata") or {}).get("labels", {}).get("app.kubernetes.io/component", ""))
    ]
    for doc in csi_docs:
        if doc["kind"] in ("ServiceAccount", "Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding"):
            stack.cluster.apply(doc)
    (controller,) = [d for d in csi_docs if d["kind"] == "Deployment"]
    account = controller["spec"]["template"]["spec"]["serviceAccountName"]
    token = stack.cluster.api.issue_token("default", account, expiration_seconds=3600)
    (daemonset,) = [d for d in csi_docs if d["kind"] == "DaemonSet"]
    node_account = daemonset["spec"]["template"]["spec"]["serviceAccountName"]
    node_token = stack.cluster.api.issue_token("default", node_account, expiration_seconds=3600)
    from pairvol.localcluster import kubeconfig as kubeconfig_mod

    kubeconfig = await kubeconfig_mod.write(stack.root / "csi-controller-kubeconfig", stack.cluster.url, token=token)
    objects = [d for d in csi_docs if d["kind"] in ("CSIDriver", "StorageClass")]
    for sc in (o for o in objects if o["kind"] == "StorageClass"):  # fast checkpoints and failovers
        sc["parameters"].update(checkpointIntervalSeconds="2", gracePeriodSeconds="1")
    code, out, err = await kubectl(stack, "apply", "-f", "-", stdin="\n---\n".join(json.dumps(o) for o in objects))
    assert code == 0, err
    assert "csidriver.storage.k8s.io/pairvol.io created" in out and "storageclass.storage.k8s.io/pairvol created" in out
    async with LocalCsi(
        stack.sim, controller_kubeconfig=kubeconfig, node_token=node_token, log_dir=stack.root
    ) as driver:
        yield driver


async def kubectl(stack: Stack, *args: str, stdin: str | None = None) -> tuple[int, str, str]:
    env = {**os.environ, "KUBECONFIG": str(stack.cluster.kubeconfig_path), "KUBECACHEDIR": str(stack.root / "kc")}
    proc = await asyncio.create_subprocess_exec(
        tool("kubectl"), *args, env=env,
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await bounded(proc.communicate(stdin.encode() if stdin is not None else None), 30)
    return proc.returncode or 0, out.decode(), err.decode()


async def get_or_none(stack: Stack, path: str) -> dict[str, Any] | None:
    return await stack.kube.get_or_none(path)


async def pod_log(stack: Stack, node: str, name: str) -> str:
    path: Path = stack.sim.log_path(node, "default", name)
    return await asyncio.to_thread(lambda: path.read_text() if path.exists() else "")


async def records_acked(stack: Stack, node: str, name: str) -> int:
    """How many records the stream writer in pod ``name`` on ``node`` has had acknowledged (fsynced)."""
    lines = [ln for ln in (await pod_log(stack, node, name)).splitlines() if ln.startswith("acked ")]
    return int(lines[-1].split()[1]) + 1 if lines else 0


async def acked_at_least(stack: Stack, node: str, name: str, n: int) -> int | None:
    """The writer's acknowledged records once there are ``n`` or more, else None (for ``wait_for``)."""
    count = await records_acked(stack, node, name)
    return count if count >= n else None


async def pod_events(stack: Stack, name: str) -> list[str]:
    return [f"{e.get('reason')}: {e.get('message')}" for e in await stack.events(name)]


async def delete_pod(stack: Stack, name: str) -> None:
    await stack.kube.delete(f"/api/v1/namespaces/default/pods/{name}")

    async def gone() -> bool:
        return await get_or_none(stack, f"/api/v1/namespaces/default/pods/{name}") is None

    await stack.wait_for(f"pod {name} finalized by its kubelet", gone, 30)


async def until_writing(stack: Stack, pod_name: str, what: str, check: Any, within: float) -> Any:
    """``stack.wait_for``, but a pod whose file system mount refuses as corrupt fails at once."""

    async def written_or_corrupt() -> Any:
        corrupt = [e for e in await pod_events(stack, pod_name) if CORRUPT in e]
        assert not corrupt, f"pod {pod_name}: the file system NodeStageVolume made is corrupt: {corrupt[-1][:400]}"
        return await check()

    return await stack.wait_for(what, written_or_corrupt, within)


async def node_mounts(csi: LocalCsi, node: str) -> list[str]:
    info = await asyncio.to_thread(Path("/proc/self/mountinfo").read_text)
    root = csi.kubelet_dir(node)
    return [m for m in mounts_under(info, [root]) if Path(m) != root]


async def test_a_claim_is_provisioned_mounted_remounted_elsewhere_and_deleted(stack: Stack, csi: LocalCsi) -> None:
    # the registrar: every node lists the driver with its node ID
    for node in stack.sim.node_names:
        csinode = await stack.kube.get(f"/apis/storage.k8s.io/v1/csinodes/{node}")
        assert csinode["spec"]["drivers"][0]["name"] == "pairvol.io"
        assert csinode["spec"]["drivers"][0]["nodeID"] == node

    # a pod whose claim does not exist waits, and its events say why
    await stack.kube.create("/api/v1/namespaces/default/pods", pod("orphan", "node-3", "missing", VERIFIER))

    async def failed_mount() -> list[str]:
        return [e for e in await pod_events(stack, "orphan") if 'persistentvolumeclaim "missing" not found' in e]

    assert (await stack.wait_for("FailedMount of the orphan pod", failed_mount, 20))[0].startswith("FailedMount")

    claim_yaml = CLAIM.format(name="data", mode="Filesystem", size=FS_SIZE)
    code, out, err = await kubectl(stack, "apply", "-f", "-", stdin=claim_yaml)
    assert (code, out.strip()) == (0, "persistentvolumeclaim/data created"), err
    # the pod may come before the claim is bound: its kubelet waits for the binding
    await stack.kube.create("/api/v1/namespaces/default/pods", pod("writer", "node-1", "data", WRITER))

    async def bound() -> dict[str, Any] | None:
        claim = await stack.kube.get("/api/v1/namespaces/default/persistentvolumeclaims/data")
        return claim if (claim.get("status") or {}).get("phase") == "Bound" else None

    claim = await stack.wait_for("claim data Bound", bound, 60)
    pv_name = claim["spec"]["volumeName"]
    assert pv_name == f"pvc-{claim['metadata']['uid']}"
    pv = await stack.kube.get(f"/api/v1/persistentvolumes/{pv_name}")
    assert pv["status"]["phase"] == "Bound"
    assert pv["spec"]["persistentVolumeReclaimPolicy"] == "Delete"
    assert pv["spec"]["claimRef"]["uid"] == claim["metadata"]["uid"]
    assert pv["spec"]["csi"]["driver"] == "pairvol.io"
    assert pv["spec"]["csi"]["volumeHandle"] == f"default/{pv_name}"
    assert pv["spec"]["csi"]["fsType"] == "ext4"
    sc = await stack.kube.get("/apis/storage.k8s.io/v1/storageclasses/pairvol")  # the chart's
    secret = sc["parameters"]["csi.storage.k8s.io/node-stage-secret-name"].replace("${pv.name}", pv_name)
    assert pv["spec"]["csi"]["nodeStageSecretRef"] == {"namespace": "default", "name": secret}
    rv = await stack.volume(pv_name)
    assert rv["status"]["phase"] == "Replicating"
    assert rv["spec"]["checkpoint"]["intervalSeconds"] == 2  # from the StorageClass's parameters
    assert rv["spec"]["reclaimPolicy"] == "Delete"  # the images go with it
    images = [
        stack.sim.host_path(rv["status"][role]["node"], f"/var/lib/pairvol/default/{pv_name}")
        for role in ("primary", "secondary")
    ]
    assert all(d.is_dir() for d in images)
    code, out, err = await kubectl(stack, "get", "pvc", "data")
    assert code == 0 and out.splitlines()[1].split()[:3] == ["data", "Bound", pv_name], out + err

    async def written() -> bool:
        return f"written {RECORDS}" in await pod_log(stack, "node-1", "writer")

    await until_writing(stack, "writer", "the writer's records fsynced", written, 60)
    assert await node_mounts(csi, "node-1"), "the volume is mounted on node-1 while the writer runs"

    await delete_pod(stack, "writer")
    assert await node_mounts(csi, "node-1") == [], "node-1 unpublished and unstaged the volume"

    # another node mounts the same claim and finds every record
    await stack.kube.create("/api/v1/namespaces/default/pods", pod("reader", "node-2", "data", VERIFIER))

    async def verified() -> str | None:
        got = await stack.kube.get("/api/v1/namespaces/default/pods/reader")
        phase = (got.get("status") or {}).get("phase")
        return phase if phase in ("Succeeded", "Failed") else None

    phase = await stack.wait_for("the reader's verification", verified, 60)
    log = await pod_log(stack, "node-2", "reader")
    assert phase == "Succeeded" and f"verified {RECORDS}" in log, log

    # a claim deleted while a pod still names it stays (pvc-protection) until the pod is gone
    await stack.kube.delete("/api/v1/namespaces/default/persistentvolumeclaims/data")
    await asyncio.sleep(1.0)
    kept = await get_or_none(stack, "/api/v1/namespaces/default/persistentvolumeclaims/data")
    assert kept is not None and kept["metadata"].get("deletionTimestamp"), "the claim is protected while in use"
    # a finished pod goes from the API at once; its node unmounts the volume right after,
    # and only then may the volume be deleted
    await delete_pod(stack, "reader")

    async def unmounted() -> bool:
        return await node_mounts(csi, "node-2") == []

    await stack.wait_for("node-2 unpublished and unstaged the volume", unmounted, 20)

    async def reclaimed() -> bool:
        pv_gone = await get_or_none(stack, f"/api/v1/persistentvolumes/{pv_name}") is None
        rv_gone = await get_or_none(stack, f"/apis/pairvol.io/v1alpha1/namespaces/default/replicatedvolumes/{pv_name}")
        return pv_gone and rv_gone is None

    await stack.wait_for("PV and ReplicatedVolume deleted (reclaimPolicy Delete)", reclaimed, 60)
    assert [d for d in images if d.exists()] == [], "both replicas' images deleted"
    await delete_pod(stack, "orphan")


async def claimed(stack: Stack, name: str, mode: str, size: str = "64Mi") -> str:
    """Apply a claim, wait until it is Bound; its PV's (= ReplicatedVolume's) name."""
    code, _, err = await kubectl(stack, "apply", "-f", "-", stdin=CLAIM.format(name=name, mode=mode, size=size))
    assert code == 0, err

    async def bound() -> str | None:
        claim = await stack.kube.get(f"/api/v1/namespaces/default/persistentvolumeclaims/{name}")
        return claim["spec"].get("volumeName") if (claim.get("status") or {}).get("phase") == "Bound" else None

    pv_name: str = await stack.wait_for(f"claim {name} Bound", bound, 60)
    return pv_name


async def finished(stack: Stack, node: str, name: str) -> str:
    """Until the pod ended; its log (asserting it succeeded)."""

    async def phase() -> str | None:
        got = await stack.kube.get(f"/api/v1/namespaces/default/pods/{name}")
        value = (got.get("status") or {}).get("phase")
        return value if value in ("Succeeded", "Failed") else None

    result = await stack.wait_for(f"pod {name} to finish", phase, 60)
    log = await pod_log(stack, node, name)
    assert result == "Succeeded", log
    return log


async def reclaimed(stack: Stack, claim: str, pv_name: str) -> None:
    await stack.kube.delete(f"/api/v1/namespaces/default/persistentvolumeclaims/{claim}")

    async def gone() -> bool:
        pv = await get_or_none(stack, f"/api/v1/persistentvolumes/{pv_name}")
        rv = await get_or_none(stack, f"/apis/pairvol.io/v1alpha1/namespaces/default/replicatedvolumes/{pv_name}")
        return pv is None and rv is None

    await stack.wait_for(f"{pv_name} and its ReplicatedVolume deleted", gone, 60)


async def test_a_block_claim_is_a_raw_device_that_moves_between_nodes(stack: Stack, csi: LocalCsi) -> None:
    pv_name = await claimed(stack, "disk", "Block")
    pv = await stack.kube.get(f"/api/v1/persistentvolumes/{pv_name}")
    assert pv["spec"]["volumeMode"] == "Block" and "fsType" not in pv["spec"]["csi"]

    await stack.kube.create(PODS, pod("writer", "node-1", "disk", BLOCK_WRITER, block=True))

    async def written() -> bool:
        return f"written {RECORDS}" in await pod_log(stack, "node-1", "writer")

    await stack.wait_for("the writer's blocks fsynced", written, 60)
    await delete_pod(stack, "writer")
    assert await node_mounts(csi, "node-1") == []

    await stack.kube.create(PODS, pod("reader", "node-2", "disk", BLOCK_VERIFIER, block=True))
    log = await finished(stack, "node-2", "reader")  # every block holds its own record
    assert f"verified {RECORDS}" in log
    await delete_pod(stack, "reader")
    await reclaimed(stack, "disk", pv_name)


async def test_a_pod_keeps_writing_through_a_latest_mode_failover_without_a_restart(
    stack: Stack, csi: LocalCsi
) -> None:
    pv_name = await claimed(stack, "data", "Filesystem", FS_SIZE)
    st = await stack.status(pv_name)
    replicas = {st["primary"]["node"], st["secondary"]["node"]}
    (node,) = sorted(set(stack.sim.node_names) - replicas)  # the pod runs on neither replica's node
    await stack.kube.create("/api/v1/namespaces/default/pods", pod("writer", node, "data", STREAM_WRITER, "0"))

    def acked() -> Awaitable[int]:
        return records_acked(stack, node, "writer")

    def at_least(n: int) -> Awaitable[int | None]:
        return acked_at_least(stack, node, "writer", n)

    await until_writing(stack, "writer", "the writer's first records", lambda: at_least(20), 60)
    old = st["primary"]["node"]
    await stack.sim.kill_node(old)
    before = await acked()

    async def failed_over() -> dict[str, Any] | None:
        now = await stack.status(pv_name)
        return (
            now
            if (now.get("lastFailover") or {}).get("durationMs") is not None and (now["primary"]["node"] != old)
            else None
        )

    await stack.wait_for("the failover", failed_over, 60)
    after = await stack.wait_for("records acknowledged on the new primary", lambda: at_least(before + 20), 60)

    writer = await stack.kube.get("/api/v1/namespaces/default/pods/writer")
    (status,) = writer["status"]["containerStatuses"]
    assert writer["status"]["phase"] == "Running" and status["restartCount"] == 0, writer["status"]
    assert "Error" not in await pod_log(stack, node, "writer")  # no I/O error reached the pod

    await delete_pod(stack, "writer")  # SIGTERM: it stops; its node unmounts (flush) and unstages
    survivor = sorted(replicas - {old})[0]
    await stack.kube.create(
        "/api/v1/namespaces/default/pods", pod("reader", survivor, "data", PREFIX_VERIFIER, str(after))
    )
    log = await finished(stack, survivor, "reader")
    assert "verified" in log and int(log.split()[-1]) >= after
    await delete_pod(stack, "reader")


# A program that keeps a log the way a database keeps its journal: at start it recovers
# the log (every complete record intact and in order; a torn last record is cut off) and
# reports how many records it found, then appends, each record fsynced before it is
# reported ("acked N"). An I/O error ends it (exit status 1), as it would end a database.
RECOVERING_WRITER = textwrap.dedent(
    """
    import hashlib, os, sys, time
    path = "/data/log"
    data = open(path, "rb").read() if os.path.exists(path) else b""
    lines = data.split(b"\\n")[:-1]
    for seq, line in enumerate(lines):
        digest, body = line.split(b" ", 1)
        assert hashlib.sha256(body).hexdigest().encode() == digest, f"record {seq} corrupt: {line!r}"
        assert body == f"record {seq}".encode(), f"record {seq} out of order: {line!r}"
    print("recovered", len(lines), flush=True)
    with open(path, "r+b" if data else "wb") as f:
        f.truncate(sum(len(line) + 1 for line in lines))
        f.seek(0, os.SEEK_END)
        seq = len(lines)
        while True:
            body = f"record {seq}".encode()
            f.write(hashlib.sha256(body).hexdigest().encode() + b" " + body + b"\\n")
            f.flush()
            os.fsync(f.fileno())
            print("acked", seq, flush=True)
            seq += 1
            time.sleep(0.02)
    """
)


async def test_a_checkpoint_mode_failover_restarts_the_pod_on_the_cut_never_under_it(
    stack: Stack, csi: LocalCsi
) -> None:
    """Checkpoint mode rolls the disk back at a failover: the pod's attachment must not
    reconnect under its mounted file system. It fails the pod's I/O instead; the Job's next
    pod mounts the volume fresh and finds the log exactly as it was at the cut."""
    sc = await stack.kube.get("/apis/storage.k8s.io/v1/storageclasses/pairvol")
    sc["metadata"] = {"name": "pairvol-checkpoint"}
    sc["parameters"].update(failoverMode="Checkpoint", checkpointIntervalSeconds="0")  # cuts on request
    await stack.kube.create("/apis/storage.k8s.io/v1/storageclasses", sc)
    claim_yaml = CLAIM.format(name="journal", mode="Filesystem", size=FS_SIZE).replace(
        "storageClassName: pairvol", "storageClassName: pairvol-checkpoint"
    )
    code, _, err = await kubectl(stack, "apply", "-f", "-", stdin=claim_yaml)
    assert code == 0, err

    async def bound() -> str | None:
        claim = await stack.kube.get("/api/v1/namespaces/default/persistentvolumeclaims/journal")
        return claim["spec"].get("volumeName") if (claim.get("status") or {}).get("phase") == "Bound" else None

    pv_name = await stack.wait_for("claim journal Bound", bound, 60)
    rv = await stack.volume(pv_name)
    assert rv["spec"]["failover"]["mode"] == "Checkpoint"
    st = await stack.status(pv_name)
    replicas = {st["primary"]["node"], st["secondary"]["node"]}
    (node,) = sorted(set(stack.sim.node_names) - replicas)  # the pods run on neither replica's node
    template = pod("app", node, "journal", RECOVERING_WRITER, "0")
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "journal", "namespace": "default"},
        "spec": {"backoffLimit": 3, "template": {"spec": template["spec"]}},
    }
    await stack.kube.create("/apis/batch/v1/namespaces/default/jobs", job)

    async def job_pods() -> list[dict[str, Any]]:
        found = await stack.kube.get(f"{PODS}?labelSelector=job-name%3Djournal")
        return sorted(found["items"], key=lambda p: p["metadata"]["creationTimestamp"] + p["metadata"]["name"])

    async def log_of(p: dict[str, Any]) -> str:
        return await pod_log(stack, node, p["metadata"]["name"])

    async def acked(p: dict[str, Any]) -> int:
        lines = [ln for ln in (await log_of(p)).splitlines() if ln.startswith("acked ")]
        return int(lines[-1].split()[1]) + 1 if lines else 0

    async def first_pod_acked(n: int) -> int | None:
        pods = await job_pods()
        count = await acked(pods[0]) if pods else 0
        return count if count >= n else None

    await until_writing(stack, "journal", "the first pod's records", lambda: first_pod_acked(20), 60)
    (first,) = await job_pods()
    assert "recovered 0" in await log_of(first)

    # the cut: records acknowledged before it was asked for are in it; a record begun after
    # it was reported complete is not
    fsynced_before_cut = await acked(first)
    cut_id = (st.get("checkpoint") or {}).get("id") or 0
    await stack.annotate(pv_name, "pairvol.io/checkpoint", "now")

    async def cut() -> int | None:
        now = ((await stack.status(pv_name)).get("checkpoint") or {}).get("id") or 0
        return now if now > cut_id else None

    await stack.wait_for("the checkpoint", cut, 30)
    begun_before_cut_end = await acked(first) + 1
    await stack.wait_for("records after the cut", lambda: first_pod_acked(begun_before_cut_end + 20), 30)

    old = st["primary"]["node"]
    await stack.sim.kill_node(old)

    async def restarted() -> int | None:
        pods = await job_pods()
        if len(pods) < 2:
            return None
        line = [ln for ln in (await log_of(pods[-1])).splitlines() if ln.startswith("recovered ")]
        return int(line[0].split()[1]) if line and await acked(pods[-1]) >= 5 else None

    recovered = await until_writing(stack, "journal", "the Job's next pod recovering the log", restarted, 60)
    first = (await job_pods())[0]
    assert first["status"]["phase"] == "Failed", first["status"]
    assert "Input/output error" in await log_of(first)  # its I/O failed rather than reaching the old disk
    status = await stack.status(pv_name)
    assert status["primary"]["node"] != old and status["lastFailover"]["mode"] == "Checkpoint", status
    assert fsynced_before_cut <= recovered <= begun_before_cut_end, (
        f"the log after the failover holds {recovered} records; the cut holds at least {fsynced_before_cut} "
        f"and at most {begun_before_cut_end}"
    )

    # the file system of the rolled-back disk, after the Job's pods are gone: fsck finds it clean
    await stack.kube.delete("/apis/batch/v1/namespaces/default/jobs/journal")

    async def released() -> bool:
        return not await job_pods() and await node_mounts(csi, node) == []

    await stack.wait_for("the Job's pods gone and the volume unstaged", released, 60)
    image = await copy_export(stack, await stack.status(pv_name), stack.root / "journal.img")
    proc = await asyncio.create_subprocess_exec(
        "e2fsck", "-fn", str(image), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await proc.communicate()
    assert proc.returncode == 0, f"fsck of the volume after the failover: {out.decode()}"
    await asyncio.to_thread(image.unlink)
