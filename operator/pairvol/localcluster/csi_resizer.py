"""The local cluster's external-resizer and the kubelet's online expansion: a bound claim
whose ``resources.requests.storage`` grew gets a volume of the new size, through the CSI
plugins' real gRPC sockets.

Why: the csi-resizer sidecar (and the kubelet's expansion, in Go) are not available here.
This module does what they do for one driver, in Kubernetes' order and with its records:

* the API server admits a larger request only for a bound claim whose StorageClass says
  ``allowVolumeExpansion: true``, and never a smaller one (:mod:`pairvol.localcluster.
  storage_admission`);
* a bound claim of the driver whose request is larger than its PV's capacity gets the
  condition ``Resizing`` and a ``Resizing`` event, then ``ControllerExpandVolume`` (the
  PV's volume handle, the request as ``required_bytes``, the PV's access type); a failure
  is a ``VolumeResizeFailed`` event and is retried with back-off (1 s doubling to 30 s);
* on success the PV's ``spec.capacity`` is the answer's ``capacity_bytes``. If the plugin
  needs no node expansion (a Block volume), the claim's ``status.capacity`` is that size
  and its conditions are cleared (``VolumeResizeSuccessful``); otherwise the claim gets
  ``FileSystemResizePending`` (``FileSystemResizeRequired``);
* the kubelet's part: for a claim whose PV capacity exceeds its ``status.capacity``, the
  node that has the volume published calls ``NodeExpandVolume``
  (:meth:`pairvol.localcluster.kubelet_csi.NodeVolumes.expand`); then the claim's
  ``status.capacity`` is the PV's and the condition goes (``FileSystemResizeSuccessful``).
  A volume no pod mounts stays pending until one does, as on a real node.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from decimal import ROUND_CEILING
from pathlib import Path
from typing import Any

from pairvol.api.quantity import QuantityError, parse_quantity
from pairvol.errors import PairvolError
from pairvol.localcluster.csi_client import CsiCallError
from pairvol.localcluster.csi_provisioner import ProvisionError, claim_size
from pairvol.localcluster.kubelet_api import MERGE_PATCH, ApiError, KubeApi
from pairvol.localcluster.kubelet_csi import ACCESS_MODES, NodeVolumes
from pairvol.localcluster.kubelet_pods import KubeletError
from pairvol.localcluster.sidecar_loop import SidecarLoop

logger = logging.getLogger(__name__)

JsonDict = dict[str, Any]

RESIZING = "Resizing"
FS_RESIZE_PENDING = "FileSystemResizePending"


def quantity_bytes(raw: object) -> int:
    try:
        return int(parse_quantity(str(raw)).to_integral_value(rounding=ROUND_CEILING))
    except QuantityError:
        return 0


def capability(pv: Mapping[str, Any]) -> JsonDict:
    """The PV's access type and mode as the resizer passes them (pure)."""
    spec = pv.get("spec") or {}
    modes = [m for m in spec.get("accessModes") or [] if m in ACCESS_MODES]
    access = {"mode": ACCESS_MODES[modes[0]] if modes else "SINGLE_NODE_WRITER"}
    if spec.get("volumeMode") == "Block":
        return {"block": {}, "accessMode": access}
    return {"mount": {"fsType": str((spec.get("csi") or {}).get("fsType") or "")}, "accessMode": access}


def condition(kind: str, message: str = "") -> JsonDict:
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return {"type": kind, "status": "True", "lastProbeTime": None, "lastTransitionTime": now, "message": message}


class Resizer(SidecarLoop):
    """``async with Resizer(api, driver, controller_socket, nodes)``; ``nodes()`` gives the
    kubelets' CSI volume managers by node name."""

    name = "csi resizer"
    watched = ("/api/v1/persistentvolumeclaims",)
    retryable = (PairvolError, ApiError)

    def __init__(
        self,
        api: KubeApi,
        driver: str,
        socket: Path,
        nodes: Callable[[], Mapping[str, NodeVolumes]],
        *,
        resync: float = 1.0,
        backoff_base: float = 1.0,
        backoff_cap: float = 30.0,
        timeout: float = 60.0,
    ) -> None:
        super().__init__(
            api, socket, resync=resync, backoff_base=backoff_base, backoff_cap=backoff_cap, timeout=timeout
        )
        self.driver = driver
        self.nodes = nodes

    async def sync_once(self) -> None:
        claims, _ = await self.api.list_all("/api/v1/persistentvolumeclaims")
        volumes, _ = await self.api.list_all("/api/v1/persistentvolumes")
        classes, _ = await self.api.list_all("/apis/storage.k8s.io/v1/storageclasses")
        ours = {c["metadata"]["name"] for c in classes if c.get("provisioner") == self.driver}
        pvs = {pv["metadata"]["name"]: pv for pv in volumes}
        for claim in claims:
            spec, status = claim.get("spec") or {}, claim.get("status") or {}
            pv = pvs.get(str(spec.get("volumeName")))
            if spec.get("storageClassName") not in ours or status.get("phase") != "Bound" or pv is None:
                continue
            if claim["metadata"].get("deletionTimestamp"):
                continue
            try:
                requested = claim_size(claim)
            except ProvisionError:
                continue
            uid = str(claim["metadata"]["uid"])
            pv_size = quantity_bytes(((pv.get("spec") or {}).get("capacity") or {}).get("storage"))
            have = quantity_bytes((status.get("capacity") or {}).get("storage"))
            if requested > pv_size:
                self._start(uid, self._expand_controller(claim, pv, requested))
            elif pv_size > have:
                self._start(uid, self._expand_node(claim, pv, pv_size))

    # -- the external-resizer --------------------------------------------------------------

    async def _expand_controller(self, claim: JsonDict, pv: JsonDict, requested: int) -> None:
        meta = claim["metadata"]
        path = f"/api/v1/namespaces/{meta['namespace']}/persistentvolumeclaims/{meta['name']}"
        pv_name = pv["metadata"]["name"]
        conditions = (claim.get("status") or {}).get("conditions") or []
        if not any(c.get("type") == RESIZING for c in conditions):
            await self._status(path, {"conditions": [condition(RESIZING)]})
            await self._event(claim, "Normal", "Resizing", f"External resizer is resizing volume {pv_name}")
        request = {
            "volumeId": pv["spec"]["csi"]["volumeHandle"],
            "capacityRange": {"requiredBytes": str(requested)},
            "volumeCapability": capability(pv),
        }
        try:
            answer = await self._client.call("Controller", "ControllerExpandVolume", request, timeout=self.timeout)
        except CsiCallError as exc:
            await self._event(claim, "Warning", "VolumeResizeFailed", f"resize volume {pv_name} failed: {exc}")
            raise
        size = int(answer.get("capacityBytes") or requested)
        await self.api.request(
            "PATCH", f"/api/v1/persistentvolumes/{pv_name}",
            body={"spec": {"capacity": {"storage": str(size)}}}, content_type=MERGE_PATCH,
        )  # fmt: skip
        if answer.get("nodeExpansionRequired"):
            message = "Waiting for user to (re-)start a pod to finish file system resize of volume on node."
            await self._status(path, {"conditions": [condition(FS_RESIZE_PENDING, message)]})
            required = "Require file system resize of volume on node"
            await self._event(claim, "Normal", "FileSystemResizeRequired", required)
        else:
            await self._status(path, {"capacity": {"storage": str(size)}, "conditions": []})
            await self._event(claim, "Normal", "VolumeResizeSuccessful", f"ExternalResizer resized volume {pv_name}")
        logger.info("resized %s to %d bytes (claim %s/%s)", pv_name, size, meta["namespace"], meta["name"])

    # -- the kubelet's part ----------------------------------------------------------------

    async def _expand_node(self, claim: JsonDict, pv: JsonDict, size: int) -> None:
        meta = claim["metadata"]
        pv_name = pv["metadata"]["name"]
        expanded = []
        for node, volumes in sorted(self.nodes().items()):
            try:
                if await volumes.expand(pv_name, size):
                    expanded.append(node)
            except KubeletError as exc:
                await self._event(claim, "Warning", "FileSystemResizeFailed", str(exc))
                raise PairvolError(str(exc)) from exc
        if not expanded:
            return  # no pod mounts it: the file system grows when one does
        path = f"/api/v1/namespaces/{meta['namespace']}/persistentvolumeclaims/{meta['name']}"
        await self._status(path, {"capacity": {"storage": str(size)}, "conditions": []})
        await self._event(
            claim, "Normal", "FileSystemResizeSuccessful",
            f"MountVolume.NodeExpandVolume succeeded for volume {pv_name!r} {', '.join(expanded)}",
        )  # fmt: skip

    # -- records ---------------------------------------------------------------------------

    async def _status(self, path: str, status: JsonDict) -> None:
        await self.api.request("PATCH", path + "/status", body={"status": status}, content_type=MERGE_PATCH)

    async def _event(self, obj: Mapping[str, Any], type_: str, reason: str, message: str) -> None:
        meta = obj.get("metadata") or {}
        namespace = str(meta.get("namespace") or "default")
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{meta.get('name')}.", "namespace": namespace},
            "involvedObject": {
                "apiVersion": "v1",
                "kind": "PersistentVolumeClaim",
                "name": meta.get("name"),
                "namespace": namespace,
                "uid": meta.get("uid"),
            },
            "reason": reason,
            "message": message,
            "type": type_,
            "source": {"component": "external-resizer " + self.driver},
            "reportingComponent": "external-resizer " + self.driver,
            "count": 1,
        }
        with contextlib.suppress(ApiError):
            await self.api.request("POST", f"/api/v1/namespaces/{namespace}/events", body=event)
