"""A claim grows while its pod writes, end to end on the local cluster.

``kubectl patch pvc`` asks for more; the local cluster's resizer (the csi-resizer sidecar's
part) calls ControllerExpandVolume, which grows the ReplicatedVolume's spec.size; the real
operator grows both replicas (the secondary first, then the primary) and resyncs them; the
PV gets the new capacity and the claim FileSystemResizePending; the pod's node calls
NodeExpandVolume (the kubelet's part), which grows the attachment and the mounted file
system; the claim's capacity is the new size. The pod is never restarted, sees no I/O
error, and every record it had acknowledged is there afterwards.

The file system is xfs: ext4 grows online only with CAP_SYS_RESOURCE, which the bounding set
of the machines this suite runs on lacks (docs/csi.md, Expansion).
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import pytest
from tests.e2e.test_e2e_csi import (  # noqa: F401 - the csi fixture
    BLOCK_WRITER,
    CLAIMS,
    PODS,
    PREFIX_VERIFIER,
    STREAM_WRITER,
    acked_at_least,
    claimed,
    csi,
    delete_pod,
    finished,
    kubectl,
    pod,
    pod_events,
    pod_log,
    records_acked,
)

from pairvol.localcluster.csi_plugins import LocalCsi
from pairvol.localcluster.demo import Stack

pytestmark = pytest.mark.timeout(150)

MiB = 1 << 20


async def xfs_class(stack: Stack) -> None:
    """The chart's StorageClass, as ``pairvol-xfs`` with xfs."""
    sc = await stack.kube.get("/apis/storage.k8s.io/v1/storageclasses/pairvol")
    assert sc["allowVolumeExpansion"] is True
    body = {k: v for k, v in sc.items() if k not in ("metadata", "status")}
    body["metadata"] = {"name": "pairvol-xfs"}
    body["parameters"] = {**sc["parameters"], "csi.storage.k8s.io/fstype": "xfs"}
    code, _, err = await kubectl(stack, "apply", "-f", "-", stdin=json.dumps(body))
    assert code == 0, err


async def grow(stack: Stack, claim: str, size: str) -> None:
    patch = json.dumps({"spec": {"resources": {"requests": {"storage": size}}}})
    code, _, err = await kubectl(stack, "patch", "pvc", claim, "--type=merge", "-p", patch)
    assert code == 0, err


async def resized(stack: Stack, claim: str, size: int) -> dict[str, Any]:
    async def done() -> dict[str, Any] | None:
        got = await stack.kube.get(f"{CLAIMS}/{claim}")
        status = got.get("status") or {}
        have = int((status.get("capacity") or {}).get("storage", "0"))
        return got if have >= size and not status.get("conditions") else None

    result: dict[str, Any] = await stack.wait_for(f"claim {claim} at {size} bytes", done, 90)
    return result


async def test_a_mounted_file_system_grows_while_its_pod_writes(stack: Stack, csi: LocalCsi) -> None:  # noqa: F811
    await xfs_class(stack)
    claim_yaml = (
        "apiVersion: v1\nkind: PersistentVolumeClaim\nmetadata: {name: data, namespace: default}\n"
        "spec: {storageClassName: pairvol-xfs, accessModes: [ReadWriteOnce], "
        "resources: {requests: {storage: 320Mi}}}\n"
    )
    code, _, err = await kubectl(stack, "apply", "-f", "-", stdin=claim_yaml)
    assert code == 0, err

    async def bound() -> str | None:
        got = await stack.kube.get(f"{CLAIMS}/data")
        return got["spec"].get("volumeName") if (got.get("status") or {}).get("phase") == "Bound" else None

    pv_name = await stack.wait_for("claim data Bound", bound, 60)
    node = "node-3"
    await stack.kube.create(PODS, pod("writer", node, "data", STREAM_WRITER, "0"))

    def acked() -> Awaitable[int]:
        return records_acked(stack, node, "writer")

    def at_least(n: int) -> Awaitable[int | None]:
        return acked_at_least(stack, node, "writer", n)

    await stack.wait_for("the writer's first records", lambda: at_least(20), 60)
    writer = await stack.kube.get(f"{PODS}/writer")
    mount = csi.kubelet_dir(node) / "pods" / writer["metadata"]["uid"] / "volumes/kubernetes.io~csi" / pv_name / "mount"
    before = os.statvfs(mount)

    await grow(stack, "data", "400Mi")
    claim = await resized(stack, "data", 400 * MiB)
    pv = await stack.kube.get(f"/api/v1/persistentvolumes/{pv_name}")
    assert int(pv["spec"]["capacity"]["storage"]) == 400 * MiB
    rv = await stack.volume(pv_name)
    assert rv["status"]["size"] == 400 * MiB and rv["status"]["phase"] == "Replicating"
    after = os.statvfs(mount)
    assert after.f_blocks * after.f_frsize > before.f_blocks * before.f_frsize + 70 * MiB
    reasons = [e.split(":")[0] for e in await pod_events(stack, "data")]
    assert {"Resizing", "FileSystemResizeRequired", "FileSystemResizeSuccessful"} <= set(reasons), reasons
    assert claim["status"]["capacity"]["storage"] == str(400 * MiB)

    now = await acked()
    done = await stack.wait_for("records after the grow", lambda: at_least(now + 10), 60)
    writer = await stack.kube.get(f"{PODS}/writer")
    (status,) = writer["status"]["containerStatuses"]
    assert writer["status"]["phase"] == "Running" and status["restartCount"] == 0, writer["status"]
    assert "Error" not in await pod_log(stack, node, "writer")  # no I/O error reached the pod
    await delete_pod(stack, "writer")
    await stack.kube.create(PODS, pod("reader", "node-1", "data", PREFIX_VERIFIER, str(done)))
    log = await finished(stack, "node-1", "reader")
    assert "verified" in log and int(log.split()[-1]) >= done
    await delete_pod(stack, "reader")


async def test_a_block_claim_grows_to_the_new_device_size(stack: Stack, csi: LocalCsi) -> None:  # noqa: F811
    pv_name = await claimed(stack, "disk", "Block")
    await stack.kube.create(PODS, pod("writer", "node-3", "disk", BLOCK_WRITER, block=True))

    async def written() -> bool:
        return "written" in await pod_log(stack, "node-3", "writer")

    await stack.wait_for("the writer's blocks fsynced", written, 60)
    await grow(stack, "disk", "128Mi")
    await resized(stack, "disk", 128 * MiB)
    device = csi.kubelet_dir("node-3") / "plugins/kubernetes.io/csi/volumeDevices/publish" / pv_name

    def size() -> int:
        (published,) = list(Path(device).iterdir())
        fd = os.open(published, os.O_RDONLY)
        try:
            return os.lseek(fd, 0, os.SEEK_END)
        finally:
            os.close(fd)

    assert await asyncio.to_thread(size) == 128 * MiB  # the device the pod has
    await delete_pod(stack, "writer")
