"""The local cluster's PV binder for claims that name their PV (static binding), against its
API server: a PV of the driver without a ``claimRef`` is Available and never reclaimed,
whatever its reclaim policy; a claim naming it is bound to it, not provisioned; a claim naming
a PV bound to another claim waits and is told why. (The whole Retain story, with the driver:
tests/e2e/test_e2e_csi_reclaim.py.)"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pairvol.localcluster.csi_provisioner import PROVISIONED_BY, Provisioner
from pairvol.localcluster.kubelet_api import KubeApi

CLAIMS = "/api/v1/namespaces/default/persistentvolumeclaims"
PVS = "/api/v1/persistentvolumes"


def claim(name: str, volume: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "storageClassName": "pairvol",
            "accessModes": ["ReadWriteOnce"],
            "resources": {"requests": {"storage": "64Mi"}},
            "volumeName": volume,
        },
    }


async def test_a_freed_pv_is_available_and_bound_to_the_claim_that_names_it(api: KubeApi, tmp_path: Path) -> None:
    await api.request("POST", "/apis/storage.k8s.io/v1/storageclasses", body={
        "apiVersion": "storage.k8s.io/v1", "kind": "StorageClass", "metadata": {"name": "pairvol"},
        "provisioner": "pairvol.io", "reclaimPolicy": "Delete",
    })  # fmt: skip
    await api.request("POST", PVS, body={
        "apiVersion": "v1", "kind": "PersistentVolume",
        "metadata": {"name": "pvc-old", "annotations": {PROVISIONED_BY: "pairvol.io"}},
        "spec": {
            "capacity": {"storage": "64Mi"}, "accessModes": ["ReadWriteOnce"], "volumeMode": "Filesystem",
            "persistentVolumeReclaimPolicy": "Delete", "storageClassName": "pairvol",
            "csi": {"driver": "pairvol.io", "volumeHandle": "default/pvc-old"},
        },
    })  # fmt: skip
    # no plugin listens: a DeleteVolume or CreateVolume would be an operation started (and failing)
    binder = Provisioner(api, "pairvol.io", tmp_path / "no-plugin.sock")

    await binder.sync_once()
    pv = await api.request("GET", f"{PVS}/pvc-old")
    assert pv["status"]["phase"] == "Available"
    assert binder._busy == {}, "a PV without a claim is not reclaimed, even with reclaim policy Delete"

    await api.request("POST", CLAIMS, body=claim("again", "pvc-old"))
    await binder.sync_once()
    again = await api.request("GET", f"{CLAIMS}/again")
    assert (again["status"]["phase"], again["spec"]["volumeName"]) == ("Bound", "pvc-old")
    pv = await api.request("GET", f"{PVS}/pvc-old")
    assert pv["status"]["phase"] == "Bound" and pv["spec"]["claimRef"]["uid"] == again["metadata"]["uid"]
    assert binder._busy == {}, "bound, not provisioned"

    await api.request("POST", CLAIMS, body=claim("other", "pvc-old"))
    await binder.sync_once()
    other = await api.request("GET", f"{CLAIMS}/other")
    assert (other.get("status") or {}).get("phase") != "Bound"
    events = (await api.request("GET", "/api/v1/namespaces/default/events"))["items"]
    told = [e["message"] for e in events if e["involvedObject"]["name"] == "other" and e["reason"] == "FailedBinding"]
    assert told == ["volume 'pvc-old' already bound to a different claim (default/again)"]
