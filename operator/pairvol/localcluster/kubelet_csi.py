"""The simulated kubelet's CSI volume manager: a pod's PersistentVolumeClaims, staged and
published through the node plugin's real gRPC socket before its containers start, and
unpublished (then unstaged, when no other pod of the node uses them) after they stopped.

Why: pods reach pairvol volumes through claims; on a real node the kubelet's volume
manager does exactly these calls (``NodeStageVolume`` to the volume's global mount, then
``NodePublishVolume`` to the pod's own directory) and the container runtime binds the
published directory at the ``mountPath``. The paths are the kubelet's
(``<kubelet-dir>/plugins/kubernetes.io/csi/<driver>/<sha256(volumeHandle)>/globalmount``
and ``<kubelet-dir>/pods/<pod uid>/volumes/kubernetes.io~csi/<pv>/mount``) under the
simulated node's kubelet directory, which is a shared mount that the node plugin's mounts
propagate to (``mountPropagation: Bidirectional``, see :mod:`pairvol.localcluster.csi_plugins`).

Orderings, by structure: a pod's containers are started only after every claim of the pod
is published (:meth:`NodeVolumes.mount_claims` returns the directories they are bound
from); unpublish runs only after the pod's containers are gone (:meth:`NodeVolumes.release_pod`
is called by the pod's deletion after its runners stopped), and unstage only after the
last pod of the node using the volume was unpublished, under the volume's lock, so a pod
starting at the same time waits and stages again.

A Block-mode claim is staged at ``<kubelet-dir>/plugins/kubernetes.io/csi/volumeDevices/
staging/<pv>`` and published to a file ``…/volumeDevices/publish/<pv>/<pod uid>`` (the
device bound on it), which the container gets at its ``volumeDevices`` ``devicePath``.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import hashlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from pairvol.localcluster.csi_client import CsiCallError, CsiClient
from pairvol.localcluster.kubelet_api import ApiError, KubeApi
from pairvol.localcluster.kubelet_pods import JsonDict, KubeletError, VolumeClaim, VolumeDevice, VolumeDir

logger = logging.getLogger(__name__)

#: Kubernetes access mode -> CSI VolumeCapability.AccessMode.Mode (what the kubelet sends)
ACCESS_MODES = {
    "ReadWriteOnce": "SINGLE_NODE_WRITER",
    "ReadOnlyMany": "MULTI_NODE_READER_ONLY",
    "ReadWriteMany": "MULTI_NODE_MULTI_WRITER",
    "ReadWriteOncePod": "SINGLE_NODE_SINGLE_WRITER",
}


class VolumeNotReady(KubeletError):
    """A pod's volume cannot be mounted (yet): the pod waits in ContainerCreating, with a
    FailedMount event carrying this text, and the kubelet tries again."""


@dataclass(frozen=True)
class CsiVolume:
    """What the kubelet needs of a bound PV to stage and publish it (pure data)."""

    pv_name: str
    driver: str
    volume_handle: str
    fs_type: str
    access_mode: str
    attributes: Mapping[str, str]
    secret_ref: tuple[str, str] | None  # nodeStageSecretRef (namespace, name)
    read_only: bool
    block: bool = False


def csi_volume(claim: JsonDict, pv: JsonDict, read_only: bool) -> CsiVolume:
    """The CSI volume behind a bound claim, or VolumeNotReady saying why not (pure)."""
    meta = claim.get("metadata") or {}
    where = f"PersistentVolumeClaim {meta.get('namespace')}/{meta.get('name')}"
    spec = pv.get("spec") or {}
    csi = spec.get("csi")
    if not isinstance(csi, dict) or not csi.get("driver") or not csi.get("volumeHandle"):
        raise VolumeNotReady(f"{where}: PersistentVolume {pv['metadata']['name']} is not a CSI volume")
    mode = spec.get("volumeMode") or "Filesystem"
    if mode not in ("Filesystem", "Block"):
        raise VolumeNotReady(f"{where}: PersistentVolume {pv['metadata']['name']} has volumeMode {mode!r}")
    if mode != ((claim.get("spec") or {}).get("volumeMode") or "Filesystem"):
        raise VolumeNotReady(f"{where}: its volumeMode differs from its PersistentVolume's ({mode})")
    modes = [m for m in spec.get("accessModes") or [] if m in ACCESS_MODES]
    if not modes:
        raise VolumeNotReady(f"{where}: PersistentVolume {pv['metadata']['name']} has no access mode")
    ref = csi.get("nodeStageSecretRef") or None
    return CsiVolume(
        pv_name=str(pv["metadata"]["name"]),
        driver=str(csi["driver"]),
        volume_handle=str(csi["volumeHandle"]),
        fs_type=str(csi.get("fsType") or ""),
        access_mode=ACCESS_MODES[modes[0]],
        attributes={str(k): str(v) for k, v in (csi.get("volumeAttributes") or {}).items()},
        secret_ref=(str(ref.get("namespace")), str(ref.get("name"))) if ref else None,
        read_only=read_only or bool(csi.get("readOnly", False)),
        block=mode == "Block",
    )


def staging_path(kubelet_dir: Path, volume: CsiVolume) -> Path:
    """The volume's global mount on the node (the kubelet's layout since Kubernetes 1.24)."""
    csi = kubelet_dir / "plugins" / "kubernetes.io" / "csi"
    if volume.block:
        return csi / "volumeDevices" / "staging" / volume.pv_name
    digest = hashlib.sha256(volume.volume_handle.encode()).hexdigest()
    return csi / volume.driver / digest / "globalmount"


def publish_path(kubelet_dir: Path, pod_uid: str, volume: CsiVolume) -> Path:
    if volume.block:
        devices = kubelet_dir / "plugins" / "kubernetes.io" / "csi" / "volumeDevices"
        return devices / "publish" / volume.pv_name / pod_uid
    return kubelet_dir / "pods" / pod_uid / "volumes" / "kubernetes.io~csi" / volume.pv_name / "mount"


def _decoded(secret: JsonDict) -> dict[str, str]:
    return {str(k): base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items()}


class NodeVolumes:
    """The CSI volumes of one simulated node's pods (one instance per node)."""

    def __init__(self, api: KubeApi, node: str, kubelet_dir: Path) -> None:
        self.api = api
        self.node = node
        self.kubelet_dir = kubelet_dir
        self.drivers: dict[str, Path] = {}  # registered plugins: driver name -> socket
        # pv name -> the pods (uid) it is published to on this node, and their target paths
        self._published: dict[str, dict[str, tuple[CsiVolume, Path]]] = collections.defaultdict(dict)
        # pv name -> staged on this node, or possibly (a NodeStageVolume that failed may
        # have built part of the attachment: it is unstaged like a staged one)
        self._staged: dict[str, CsiVolume] = {}
        self._tried: dict[str, set[str]] = collections.defaultdict(set)  # pod uid -> pv names
        self._locks: collections.defaultdict[str, asyncio.Lock] = collections.defaultdict(asyncio.Lock)

    def register_driver(self, name: str, socket: Path) -> None:
        """What node-driver-registrar's registration tells the kubelet."""
        self.drivers[name] = socket
        logger.info("node %s: CSI driver %s registered at %s", self.node, name, socket)

    def unregister_driver(self, name: str) -> None:
        self.drivers.pop(name, None)

    # -- mount ----------------------------------------------------------------------------

    async def mount_claims(
        self, pod: JsonDict, pod_uid: str, claims: Mapping[str, VolumeClaim]
    ) -> dict[str, VolumeDir | VolumeDevice]:
        """Stage and publish every claim of the pod; what to bind, by volume name."""
        namespace = str((pod.get("metadata") or {}).get("namespace") or "default")
        mounted: dict[str, VolumeDir | VolumeDevice] = {}
        for name, claim in sorted(claims.items()):
            volume = await self._resolve(namespace, name, claim)
            path = await self._mount(volume, pod_uid)
            mounted[name] = VolumeDevice(path) if volume.block else VolumeDir(path)
        return mounted

    async def _resolve(self, namespace: str, name: str, claim: VolumeClaim) -> CsiVolume:
        what = f"volume {name!r}"
        pvc = await self.api.get_object(namespace, "persistentvolumeclaims", claim.claim_name)
        if pvc is None:
            raise VolumeNotReady(f'{what}: persistentvolumeclaim "{claim.claim_name}" not found')
        if pvc["metadata"].get("deletionTimestamp"):
            raise VolumeNotReady(f'{what}: persistentvolumeclaim "{claim.claim_name}" is being deleted')
        phase = (pvc.get("status") or {}).get("phase")
        pv_name = (pvc.get("spec") or {}).get("volumeName")
        if phase != "Bound" or not pv_name:
            raise VolumeNotReady(f'{what}: persistentvolumeclaim "{claim.claim_name}" is not bound (phase {phase})')
        try:
            pv = await self.api.request("GET", f"/api/v1/persistentvolumes/{pv_name}")
        except ApiError as exc:
            raise VolumeNotReady(f"{what}: PersistentVolume {pv_name}: {exc}") from exc
        return csi_volume(pvc, pv, claim.read_only)

    def _socket(self, volume: CsiVolume) -> Path:
        socket = self.drivers.get(volume.driver)
        if socket is None:
            raise VolumeNotReady(
                f"MountVolume.MountDevice failed for volume {volume.pv_name!r} : kubernetes.io/csi: attacher."
                f"MountDevice failed to create newCsiDriverClient: driver name {volume.driver} not found in the "
                "list of registered CSI drivers"
            )
        return socket

    def _capability(self, volume: CsiVolume) -> JsonDict:
        access = {"mode": volume.access_mode}
        if volume.block:
            return {"block": {}, "accessMode": access}
        return {"mount": {"fsType": volume.fs_type}, "accessMode": access}

    async def _secrets(self, volume: CsiVolume) -> dict[str, str]:
        if volume.secret_ref is None:
            return {}
        namespace, name = volume.secret_ref
        secret = await self.api.get_object(namespace, "secrets", name)
        if secret is None:
            raise VolumeNotReady(
                f"MountVolume.MountDevice failed for volume {volume.pv_name!r} : fetching NodeStageSecretRef "
                f'{namespace}/{name} failed: secrets "{name}" not found'
            )
        return _decoded(secret)

    async def _mount(self, volume: CsiVolume, pod_uid: str) -> Path:
        socket = self._socket(volume)
        staging = staging_path(self.kubelet_dir, volume)
        target = publish_path(self.kubelet_dir, pod_uid, volume)
        secrets = await self._secrets(volume)
        async with self._locks[volume.pv_name]:
            self._tried[pod_uid].add(volume.pv_name)
            self._staged[volume.pv_name] = volume  # uncertain until the plugin answers
            # the CO creates the staging directory and the target's parent (CSI spec)
            await asyncio.to_thread(staging.mkdir, parents=True, exist_ok=True)
            await asyncio.to_thread(target.parent.mkdir, parents=True, exist_ok=True)
            async with CsiClient(socket) as client:
                stage = {
                    "volumeId": volume.volume_handle,
                    "stagingTargetPath": str(staging),
                    "volumeCapability": self._capability(volume),
                    "secrets": secrets,
                    "volumeContext": dict(volume.attributes),
                }
                try:
                    await client.call("Node", "NodeStageVolume", stage)
                except CsiCallError as exc:
                    raise VolumeNotReady(
                        f"MountVolume.MountDevice failed for volume {volume.pv_name!r} : {exc}"
                    ) from exc
                publish = {
                    "volumeId": volume.volume_handle,
                    "stagingTargetPath": str(staging),
                    "targetPath": str(target),
                    "volumeCapability": self._capability(volume),
                    "readonly": volume.read_only,
                    "volumeContext": dict(volume.attributes),
                }
                try:
                    await client.call("Node", "NodePublishVolume", publish)
                except CsiCallError as exc:
                    raise VolumeNotReady(f"MountVolume.SetUp failed for volume {volume.pv_name!r} : {exc}") from exc
            self._published[volume.pv_name][pod_uid] = (volume, target)
        logger.info("node %s: %s published for pod %s at %s", self.node, volume.pv_name, pod_uid, target)
        return target

    # -- expansion ------------------------------------------------------------------------

    async def expand(self, pv_name: str, size: int) -> bool:
        """The kubelet's online expansion: NodeExpandVolume for a volume published on this
        node, so its file system (or device) takes the ``size`` its PV grew to. False when
        no pod of this node has it published (it grows when one mounts it)."""
        async with self._locks[pv_name]:
            entries = self._published.get(pv_name)
            if not entries:
                return False
            volume, target = next(iter(entries.values()))
            request = {
                "volumeId": volume.volume_handle,
                "volumePath": str(target),
                "stagingTargetPath": str(staging_path(self.kubelet_dir, volume)),
                "capacityRange": {"requiredBytes": str(size)},
                "volumeCapability": self._capability(volume),
            }
            async with CsiClient(self._socket(volume), timeout=120) as client:
                try:
                    await client.call("Node", "NodeExpandVolume", request)
                except CsiCallError as exc:
                    raise KubeletError(f"MountVolume.NodeExpandVolume failed for volume {pv_name!r} : {exc}") from exc
        logger.info("node %s: %s expanded to %d bytes", self.node, pv_name, size)
        return True

    # -- unmount --------------------------------------------------------------------------

    def pods_using(self, pv_name: str) -> set[str]:
        return set(self._published.get(pv_name, {}))

    def staged_handles(self) -> set[str]:
        """Volume handles staged on this node (what ``node.status.volumesInUse`` lists)."""
        return {volume.volume_handle for volume in self._staged.values()}

    async def release_pod(self, pod_uid: str) -> None:
        """Unpublish the pod's volumes; unstage those no other pod here uses. Call only
        after the pod's containers are gone. Raises KubeletError if a call failed (the
        caller retries: nothing is forgotten before the plugin confirmed it)."""
        for pv_name in sorted(pv for pv, pods in self._published.items() if pod_uid in pods):
            async with self._locks[pv_name]:
                entry = self._published.get(pv_name, {}).get(pod_uid)
                if entry is None:
                    continue  # released meanwhile (the pod's deletion and a teardown)
                volume, target = entry
                async with CsiClient(self._socket(volume)) as client:
                    try:
                        await client.call(
                            "Node", "NodeUnpublishVolume", {"volumeId": volume.volume_handle, "targetPath": str(target)}
                        )
                    except CsiCallError as exc:
                        raise KubeletError(f"UnmountVolume.TearDown failed for volume {pv_name!r} : {exc}") from exc
                del self._published[pv_name][pod_uid]
                await asyncio.to_thread(_remove_empty_dirs, target, self.kubelet_dir)
                logger.info("node %s: %s unpublished (pod %s)", self.node, pv_name, pod_uid)
                if not self._published[pv_name]:  # no other pod of this node uses it
                    await self._unstage(volume)
        # volumes this pod tried to stage but never got published (a failed stage may have
        # built part of the attachment): unstaged unless another pod here uses them
        for pv_name in sorted(self._tried.get(pod_uid, set())):
            async with self._locks[pv_name]:
                staged = self._staged.get(pv_name)
                if staged is not None and not self._published.get(pv_name):
                    await self._unstage(staged)
        self._tried.pop(pod_uid, None)

    async def _unstage(self, volume: CsiVolume) -> None:
        """Unstage a volume published to no pod (the caller holds its lock)."""
        staging = staging_path(self.kubelet_dir, volume)
        async with CsiClient(self._socket(volume)) as client:
            try:
                await client.call(
                    "Node", "NodeUnstageVolume", {"volumeId": volume.volume_handle, "stagingTargetPath": str(staging)}
                )
            except CsiCallError as exc:
                raise KubeletError(f"UnmountDevice failed for volume {volume.pv_name!r} : {exc}") from exc
        self._published.pop(volume.pv_name, None)
        self._staged.pop(volume.pv_name, None)
        await asyncio.to_thread(_remove_empty_dirs, staging, self.kubelet_dir)
        logger.info("node %s: %s unstaged", self.node, volume.pv_name)

    async def release_all(self) -> None:
        """Unpublish and unstage everything (teardown of a cluster whose pods were killed)."""
        for pod_uid in sorted({uid for pods in self._published.values() for uid in pods}):
            try:
                await self.release_pod(pod_uid)
            except KubeletError as exc:
                logger.warning("node %s: %s", self.node, exc)
        for pv_name, volume in sorted(self._staged.items()):
            async with self._locks[pv_name]:
                if self._published.get(pv_name):
                    continue
                try:
                    await self._unstage(volume)
                except KubeletError as exc:
                    logger.warning("node %s: %s", self.node, exc)


def _remove_empty_dirs(path: Path, stop: Path) -> None:
    """Remove ``path`` and its parents up to ``stop`` while they are empty directories
    (``rmdir`` only: a directory that still holds anything, e.g. a mount, stays)."""
    current = path
    while current != stop and stop in current.parents:
        try:
            current.rmdir()
        except OSError:
            return
        current = current.parent
