"""The local cluster's external-provisioner and PV binder: PersistentVolumeClaims of a CSI
StorageClass become volumes through the controller plugin's real gRPC socket.

Why: the external-provisioner sidecar (and the binding half of kube-controller-manager's
PV controller) are Go programs from registry.k8s.io, not available here. This module does
what they do for one driver, so that a claim on the local cluster goes the same way as on a
real one:

* a claim whose StorageClass names the driver as ``provisioner`` and that is not bound yet
  gets ``CreateVolume`` (name ``pvc-<claim uid>``, capacity from
  ``resources.requests.storage``, the access mode and volume mode as a VolumeCapability,
  the StorageClass's parameters without the ``csi.storage.k8s.io/`` keys, plus the claim's
  and the PV's names as ``--extra-create-metadata`` adds them);
* the ``csi.storage.k8s.io/`` keys are handled as the sidecar handles them: ``fstype`` is
  the file system (default ext4 as the chart passes ``--default-fstype=ext4``), and the
  ``node-stage-secret-name``/``-namespace`` templates (``${pv.name}``, ``${pvc.name}``,
  ``${pvc.namespace}``) are resolved into the PV's ``nodeStageSecretRef``; other secret
  keys are refused, as this driver takes no other secrets;
* a claim of a ``WaitForFirstConsumer`` StorageClass waits (one ``WaitForFirstConsumer``
  event) until the scheduler wrote the node of its first pod on it
  (``volume.kubernetes.io/selected-node``);
* the accessibility requirements are those of the sidecar's ``Topology`` feature: the
  requisite is the class's ``allowedTopologies``, or, for a claim with a selected node,
  every node's topology where the driver is registered (its ``CSINode`` topology keys, the
  values from the Node's labels); the preferred list starts with the selected node's
  topology and goes on with the rest, or, without a selected node, is the requisite rotated
  by a hash of the volume's name (so that the first preferred node varies from volume to
  volume); an Immediate claim of a class without ``allowedTopologies`` gets none, as the
  chart runs the sidecar (``--immediate-topology=false``);
* a transient answer (ABORTED: the volume is still being created; UNAVAILABLE, ...) is
  retried with exponential back-off (1 s doubling to 30 s); every failure is a
  ``ProvisioningFailed`` event on the claim with the plugin's text, as ``kubectl describe
  pvc`` shows it; a final error (INVALID_ARGUMENT ...) is retried too, more slowly, as the
  sidecar does (the StorageClass or the claim may be fixed);
* on success it creates the PV (``spec.csi``: driver, volumeHandle, volumeAttributes,
  fsType, nodeStageSecretRef; ``claimRef`` with the claim's uid; the class's reclaim
  policy) and binds: the PV's and the claim's ``status.phase`` Bound, the claim's
  ``spec.volumeName``, capacity and access modes;
* the ``kubernetes.io/pvc-protection`` finalizer keeps a deleted claim while a pod still
  names it (what kube-controller-manager's pvc-protection controller does), so a mounted
  volume is never deleted under its pod;
* a PV whose claim is gone is ``Released``; with reclaim policy ``Delete`` the provisioner
  calls ``DeleteVolume`` — only once no node has the volume staged any more (``in_use``,
  the local cluster's stand-in for the VolumeAttachment check the sidecar makes: a pod
  that had finished is deleted from the API at once, and its node unmounts afterwards) —
  and, only after the plugin confirmed, deletes the PV; ``Retain`` leaves both;
* a PV of the driver with no ``claimRef`` (an administrator removed the one of a retained,
  Released PV) is ``Available`` and is never reclaimed; a claim that names a PV in
  ``spec.volumeName`` is bound to it, not provisioned (what the PV controller does for
  static binding, and why the sidecar skips such claims), if the PV is free or pre-bound to
  that claim; else it stays Pending with a ``FailedBinding`` event saying why.

Objects are read by list + watch and every claim and PV is also re-examined every
``resync`` seconds, so a missed event only delays.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from decimal import ROUND_CEILING
from pathlib import Path
from typing import Any

from pairvol.api.quantity import QuantityError, parse_quantity
from pairvol.errors import PairvolError
from pairvol.localcluster.csi_client import CsiCallError
from pairvol.localcluster.kubelet_api import MERGE_PATCH, ApiError, KubeApi
from pairvol.localcluster.kubelet_csi import ACCESS_MODES
from pairvol.localcluster.sidecar_loop import SidecarLoop

logger = logging.getLogger(__name__)

JsonDict = dict[str, Any]

RESERVED = "csi.storage.k8s.io/"
FSTYPE = RESERVED + "fstype"
NODE_STAGE_NAME = RESERVED + "node-stage-secret-name"
NODE_STAGE_NAMESPACE = RESERVED + "node-stage-secret-namespace"
PVC_PROTECTION = "kubernetes.io/pvc-protection"
PROVISIONED_BY = "pv.kubernetes.io/provisioned-by"
BIND_COMPLETED = "pv.kubernetes.io/bind-completed"
DEFAULT_FSTYPE = "ext4"
SELECTED_NODE = "volume.kubernetes.io/selected-node"
WAIT_FOR_FIRST_CONSUMER = "WaitForFirstConsumer"

_TEMPLATE = re.compile(r"\$\{([^}]*)\}")


class ProvisionError(PairvolError):
    """A claim cannot be provisioned as it is: the text says what to change."""


class StillInUse(PairvolError):
    """A released volume is still staged on a node: it is deleted after the node let go."""


# ------------------------------------------------------------------------------- pure


def resolve_template(template: str, key: str, pv_name: str, claim: Mapping[str, Any]) -> str:
    """A secret-name/-namespace template of a StorageClass with its variables filled in, as
    the external-provisioner does (``${pv.name}``, ``${pvc.name}``, ``${pvc.namespace}``)."""
    meta = claim.get("metadata") or {}
    values = {"pv.name": pv_name, "pvc.name": str(meta.get("name")), "pvc.namespace": str(meta.get("namespace"))}

    def fill(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in values:
            raise ProvisionError(
                f"StorageClass parameter {key}: unknown variable ${{{name}}} in {template!r} "
                f"(known: {', '.join('${' + v + '}' for v in sorted(values))})"
            )
        return values[name]

    return _TEMPLATE.sub(fill, template)


def claim_size(claim: Mapping[str, Any]) -> int:
    """``resources.requests.storage`` in bytes (rounded up to a whole byte)."""
    requests = ((claim.get("spec") or {}).get("resources") or {}).get("requests") or {}
    raw = requests.get("storage")
    if raw is None:
        raise ProvisionError("the claim has no resources.requests.storage; say how big the volume must be")
    try:
        value = parse_quantity(str(raw))
    except QuantityError as exc:
        raise ProvisionError(f"resources.requests.storage: {exc}") from exc
    return int(value.to_integral_value(rounding=ROUND_CEILING))


def create_request(
    claim: Mapping[str, Any],
    storage_class: Mapping[str, Any],
    pv_name: str,
    node_topologies: Mapping[str, Mapping[str, str]] | None = None,
) -> tuple[JsonDict, tuple[str, str] | None]:
    """The CreateVolumeRequest for a claim (CSI JSON mapping) and the PV's
    nodeStageSecretRef (namespace, name), or ProvisionError (pure). ``node_topologies``:
    each node's topology for the driver, needed for a claim with a selected node."""
    spec = claim.get("spec") or {}
    meta = claim.get("metadata") or {}
    modes = list(spec.get("accessModes") or [])
    unknown = [m for m in modes if m not in ACCESS_MODES]
    if not modes or unknown:
        raise ProvisionError(f"accessModes {modes!r}: give one of {', '.join(ACCESS_MODES)}")
    params = {str(k): str(v) for k, v in (storage_class.get("parameters") or {}).items()}
    reserved = {k: v for k, v in params.items() if k.startswith(RESERVED)}
    driver_params = {k: v for k, v in params.items() if not k.startswith(RESERVED)}
    known = {FSTYPE, NODE_STAGE_NAME, NODE_STAGE_NAMESPACE}
    extra = sorted(set(reserved) - known)
    if extra:
        raise ProvisionError(
            f"StorageClass {storage_class['metadata']['name']}: parameters {extra} are not handled here "
            f"(handled: {', '.join(sorted(known))})"
        )
    secret_ref: tuple[str, str] | None = None
    if NODE_STAGE_NAME in reserved or NODE_STAGE_NAMESPACE in reserved:
        if NODE_STAGE_NAME not in reserved or NODE_STAGE_NAMESPACE not in reserved:
            raise ProvisionError(f"StorageClass: {NODE_STAGE_NAME} and {NODE_STAGE_NAMESPACE} go together")
        secret_ref = (
            resolve_template(reserved[NODE_STAGE_NAMESPACE], NODE_STAGE_NAMESPACE, pv_name, claim),
            resolve_template(reserved[NODE_STAGE_NAME], NODE_STAGE_NAME, pv_name, claim),
        )
    block = (spec.get("volumeMode") or "Filesystem") == "Block"
    access = {"mode": ACCESS_MODES[modes[0]]}
    capability: JsonDict = (
        {"block": {}, "accessMode": access}
        if block
        else {"mount": {"fsType": reserved.get(FSTYPE) or DEFAULT_FSTYPE}, "accessMode": access}
    )
    request: JsonDict = {
        "name": pv_name,
        "capacityRange": {"requiredBytes": str(claim_size(claim))},
        "volumeCapabilities": [capability],
        "parameters": {
            **driver_params,
            # --extra-create-metadata
            RESERVED + "pvc/name": str(meta.get("name")),
            RESERVED + "pvc/namespace": str(meta.get("namespace")),
            RESERVED + "pv/name": pv_name,
        },
    }
    selected = (meta.get("annotations") or {}).get(SELECTED_NODE)
    requirements = accessibility(storage_class, pv_name, selected, node_topologies or {})
    if requirements is not None:
        request["accessibilityRequirements"] = requirements
    return request, secret_ref


def accessibility(
    storage_class: Mapping[str, Any],
    pv_name: str,
    selected: str | None,
    node_topologies: Mapping[str, Mapping[str, str]],
) -> JsonDict | None:
    """The accessibility requirements of a CreateVolume (module docstring), or None (pure)."""
    requisite = allowed_topologies(storage_class)
    if not requisite and selected:
        requisite = [{"segments": dict(seg)} for _, seg in sorted(node_topologies.items()) if seg]
    if not requisite:
        return None
    if selected:
        if not node_topologies.get(selected):
            raise ProvisionError(
                f"the claim's selected node {selected} has no topology of the driver (its node plugin is not "
                "registered there: no CSINode entry, or the Node lacks the topology labels)"
            )
        first = {"segments": dict(node_topologies[selected])}
        if first not in requisite:
            raise ProvisionError(
                f"the claim's selected node {selected} is outside the StorageClass's allowedTopologies"
            )
        preferred = [first, *(t for t in requisite if t != first)]
    else:
        shift = int(hashlib.sha256(pv_name.encode()).hexdigest(), 16) % len(requisite)
        preferred = requisite[shift:] + requisite[:shift]
    return {"requisite": requisite, "preferred": preferred}


def node_topologies(
    driver: str, csinodes: Sequence[Mapping[str, Any]], nodes: Sequence[Mapping[str, Any]]
) -> dict[str, dict[str, str]]:
    """Each node's topology for ``driver``: its CSINode's topology keys with the values of
    the Node's labels (a node missing one of them has none) (pure)."""
    labels = {str(n["metadata"]["name"]): (n["metadata"].get("labels") or {}) for n in nodes}
    out: dict[str, dict[str, str]] = {}
    for csinode in csinodes:
        name = str(csinode["metadata"]["name"])
        for entry in (csinode.get("spec") or {}).get("drivers") or []:
            if entry.get("name") != driver:
                continue
            keys = list(entry.get("topologyKeys") or [])
            values = labels.get(name, {})
            if keys and all(k in values for k in keys):
                out[name] = {k: str(values[k]) for k in keys}
    return out


def allowed_topologies(storage_class: Mapping[str, Any]) -> list[JsonDict]:
    """The StorageClass's ``allowedTopologies`` as CSI topologies, one per allowed value
    (each term a conjunction of its expressions: their values' product), as the
    external-provisioner's Topology feature builds the requisite from them (pure)."""
    out: list[JsonDict] = []
    for term in storage_class.get("allowedTopologies") or []:
        segments: list[dict[str, str]] = [{}]
        for expr in term.get("matchLabelExpressions") or []:
            segments = [{**seg, str(expr["key"]): str(v)} for seg in segments for v in expr.get("values") or []]
        out.extend({"segments": seg} for seg in segments if seg and {"segments": seg} not in out)
    return out


def pv_object(
    claim: Mapping[str, Any],
    storage_class: Mapping[str, Any],
    pv_name: str,
    driver: str,
    volume: Mapping[str, Any],
    request: Mapping[str, Any],
    secret_ref: tuple[str, str] | None,
) -> JsonDict:
    """The PV for a created volume, pre-bound to its claim (pure)."""
    meta = claim.get("metadata") or {}
    spec = claim.get("spec") or {}
    capability = request["volumeCapabilities"][0]
    csi: JsonDict = {
        "driver": driver,
        "volumeHandle": str(volume["volumeId"]),
        "volumeAttributes": dict(volume.get("volumeContext") or {}),
    }
    if "mount" in capability:
        csi["fsType"] = capability["mount"]["fsType"]
    if secret_ref is not None:
        csi["nodeStageSecretRef"] = {"namespace": secret_ref[0], "name": secret_ref[1]}
    capacity = int(volume.get("capacityBytes") or request["capacityRange"]["requiredBytes"])
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolume",
        "metadata": {"name": pv_name, "annotations": {PROVISIONED_BY: driver}},
        "spec": {
            "capacity": {"storage": str(capacity)},
            "accessModes": list(spec.get("accessModes") or []),
            "volumeMode": spec.get("volumeMode") or "Filesystem",
            "persistentVolumeReclaimPolicy": storage_class.get("reclaimPolicy") or "Delete",
            "storageClassName": storage_class["metadata"]["name"],
            "claimRef": {
                "apiVersion": "v1",
                "kind": "PersistentVolumeClaim",
                "namespace": meta.get("namespace"),
                "name": meta.get("name"),
                "uid": meta.get("uid"),
            },
            "csi": csi,
        },
    }


def static_binding_problem(claim: Mapping[str, Any], pv: Mapping[str, Any] | None) -> str | None:
    """Why the PV a claim names in ``spec.volumeName`` cannot be bound to it, or None: it
    must exist, be of the claim's StorageClass and volume mode, and be free (no
    ``claimRef``) or pre-bound to this claim (pure)."""
    meta, spec = claim.get("metadata") or {}, claim.get("spec") or {}
    name = spec.get("volumeName")
    if pv is None:
        return f"volume {name!r} not found"
    pv_spec = pv.get("spec") or {}
    ref = pv_spec.get("claimRef") or {}
    if ref and (ref.get("namespace"), ref.get("name")) != (meta.get("namespace"), meta.get("name")):
        return f"volume {name!r} already bound to a different claim ({ref.get('namespace')}/{ref.get('name')})"
    if ref.get("uid") and ref.get("uid") != meta.get("uid"):
        return f"volume {name!r} is bound to an earlier claim of that name (uid {ref['uid']}); remove its claimRef"
    if (pv_spec.get("storageClassName") or "") != (spec.get("storageClassName") or ""):
        return f"storageClassName does not match volume {name!r} ({pv_spec.get('storageClassName')!r})"
    if (pv_spec.get("volumeMode") or "Filesystem") != (spec.get("volumeMode") or "Filesystem"):
        return f"volumeMode does not match volume {name!r} ({pv_spec.get('volumeMode') or 'Filesystem'})"
    return None


def claim_in_use(claim: Mapping[str, Any], pods: list[JsonDict]) -> list[str]:
    """Names of the pods that name the claim in a volume (the pvc-protection rule; a pod
    counts until it is gone from the API, since its node unmounts only then)."""
    name = (claim.get("metadata") or {}).get("name")
    users = []
    for pod in pods:
        for volume in (pod.get("spec") or {}).get("volumes") or []:
            if (volume.get("persistentVolumeClaim") or {}).get("claimName") == name:
                users.append(str(pod["metadata"]["name"]))
                break
    return users


# ------------------------------------------------------------------------------- I/O


class Provisioner(SidecarLoop):
    """Provision, bind, protect and reclaim the claims of ``driver``'s StorageClasses,
    calling the controller plugin on ``socket``. ``async with Provisioner(...)``."""

    name = "csi provisioner"
    watched = ("/api/v1/persistentvolumeclaims", "/api/v1/persistentvolumes")
    retryable = (ProvisionError, StillInUse, CsiCallError, ApiError)

    def __init__(
        self,
        api: KubeApi,
        driver: str,
        socket: Path,
        *,
        resync: float = 1.0,
        backoff_base: float = 1.0,
        backoff_cap: float = 30.0,
        timeout: float = 30.0,
        in_use: Callable[[str], Sequence[str]] | None = None,
    ) -> None:
        super().__init__(
            api, socket, resync=resync, backoff_base=backoff_base, backoff_cap=backoff_cap, timeout=timeout
        )
        self.driver = driver
        self.socket = socket
        # the nodes that still have a volume handle staged: DeleteVolume waits for none
        self.in_use = in_use or (lambda handle: ())
        self._told_waiting: set[str] = set()  # claims (uid) told they wait for their first pod
        self._told_unbound: set[str] = set()  # (claim uid, problem) told why their PV is not bound

    def retry_delay(self, exc: BaseException, failures: int) -> float:
        """A volume still staged somewhere, or a call the plugin calls transient, is tried
        again on the usual schedule; anything else waits at least 5 s."""
        delay = super().retry_delay(exc, failures)
        transient = isinstance(exc, StillInUse) or (isinstance(exc, CsiCallError) and exc.transient)
        return delay if transient else max(delay, 5.0)

    async def sync_once(self) -> None:
        claims, _ = await self.api.list_all("/api/v1/persistentvolumeclaims")
        volumes, _ = await self.api.list_all("/api/v1/persistentvolumes")
        classes, _ = await self.api.list_all("/apis/storage.k8s.io/v1/storageclasses")
        ours = {c["metadata"]["name"]: c for c in classes if c.get("provisioner") == self.driver}
        by_uid = {str(c["metadata"].get("uid")): c for c in claims}
        pods: list[JsonDict] | None = None
        for claim in claims:
            if (claim.get("spec") or {}).get("storageClassName") not in ours:
                continue
            if claim["metadata"].get("deletionTimestamp"):
                if pods is None:
                    pods, _ = await self.api.list_all("/api/v1/pods")
                await self._unprotect(claim, pods)
                continue
            if PVC_PROTECTION not in (claim["metadata"].get("finalizers") or []):
                await self._protect(claim)
            if (claim.get("status") or {}).get("phase") == "Bound":
                continue
            if claim["spec"].get("volumeName"):  # names its PV: bound to it, never provisioned
                await self._bind_static(claim, {str(v["metadata"]["name"]): v for v in volumes})
                continue
            storage_class = ours[claim["spec"]["storageClassName"]]
            selected = (claim["metadata"].get("annotations") or {}).get(SELECTED_NODE)
            if storage_class.get("volumeBindingMode") == WAIT_FOR_FIRST_CONSUMER and not selected:
                await self._wait_for_consumer(claim)
                continue
            self._start(str(claim["metadata"]["uid"]), self._provision(claim, storage_class))
        for pv in volumes:
            if (pv["metadata"].get("annotations") or {}).get(PROVISIONED_BY) != self.driver:
                continue
            ref = (pv.get("spec") or {}).get("claimRef") or {}
            if not ref:  # free for a claim that names it
                await self._set_phase(pv, "Available")
                continue
            owner = by_uid.get(str(ref.get("uid")))
            if owner is not None and (owner.get("status") or {}).get("phase") != "Bound":
                await self._bind(owner, pv)  # provisioned but the binding was interrupted
            elif owner is None:
                self._start("pv/" + pv["metadata"]["name"], self._reclaim(pv))

    async def _event(self, obj: Mapping[str, Any], type_: str, reason: str, message: str) -> None:
        meta = obj.get("metadata") or {}
        namespace = str(meta.get("namespace") or "default")
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{meta.get('name')}.", "namespace": namespace},
            "involvedObject": {
                "apiVersion": "v1",
                "kind": obj.get("kind") or "PersistentVolumeClaim",
                "name": meta.get("name"),
                "namespace": namespace,
                "uid": meta.get("uid"),
            },
            "reason": reason,
            "message": message,
            "type": type_,
            "source": {"component": f"{self.driver}_csi-provisioner"},
            "reportingComponent": f"{self.driver}_csi-provisioner",
            "count": 1,
        }
        with contextlib.suppress(ApiError):
            await self.api.request("POST", f"/api/v1/namespaces/{namespace}/events", body=event)

    async def _wait_for_consumer(self, claim: JsonDict) -> None:
        """What the PV controller says of such a claim, once."""
        uid = str(claim["metadata"]["uid"])
        if uid not in self._told_waiting:
            self._told_waiting.add(uid)
            message = "waiting for first consumer to be created before binding"
            await self._event(claim, "Normal", WAIT_FOR_FIRST_CONSUMER, message)

    async def _provision(self, claim: JsonDict, storage_class: JsonDict) -> None:
        meta = claim["metadata"]
        pv_name = f"pvc-{meta['uid']}"
        topologies: dict[str, dict[str, str]] = {}
        if (meta.get("annotations") or {}).get(SELECTED_NODE):
            csinodes, _ = await self.api.list_all("/apis/storage.k8s.io/v1/csinodes")
            nodes, _ = await self.api.list_all("/api/v1/nodes")
            topologies = node_topologies(self.driver, csinodes, nodes)
        try:
            request, secret_ref = create_request(claim, storage_class, pv_name, topologies)
        except ProvisionError as exc:
            await self._event(claim, "Warning", "ProvisioningFailed", str(exc))
            raise
        await self._event(
            claim,
            "Normal",
            "Provisioning",
            f'External provisioner is provisioning volume for claim "{meta["namespace"]}/{meta["name"]}"',
        )
        try:
            answer = await self._client.call("Controller", "CreateVolume", request, timeout=self.timeout)
        except CsiCallError as exc:
            await self._event(
                claim, "Warning", "ProvisioningFailed", f'failed to provision volume with StorageClass "'
                f'{storage_class["metadata"]["name"]}": {exc}'
            )
            raise
        body = pv_object(claim, storage_class, pv_name, self.driver, answer["volume"], request, secret_ref)
        try:
            pv = await self.api.request("POST", "/api/v1/persistentvolumes", body=body)
        except ApiError as exc:
            if exc.status != 409:
                raise
            pv = await self.api.request("GET", f"/api/v1/persistentvolumes/{pv_name}")
        await self._event(claim, "Normal", "ProvisioningSucceeded", f"Successfully provisioned volume {pv_name}")
        logger.info("provisioned %s for claim %s/%s", pv_name, meta["namespace"], meta["name"])
        await self._bind(claim, pv)

    async def _bind(self, claim: JsonDict, pv: JsonDict) -> None:
        """What the PV controller does for a pre-bound PV: both sides Bound."""
        meta = claim["metadata"]
        name = pv["metadata"]["name"]
        await self.api.request("PATCH", f"/api/v1/persistentvolumes/{name}/status",
                               body={"status": {"phase": "Bound"}}, content_type=MERGE_PATCH)
        path = f"/api/v1/namespaces/{meta['namespace']}/persistentvolumeclaims/{meta['name']}"
        patch = {"metadata": {"annotations": {BIND_COMPLETED: "yes"}}, "spec": {"volumeName": name}}
        await self.api.request("PATCH", path, body=patch, content_type=MERGE_PATCH)
        status = {
            "phase": "Bound",
            "accessModes": pv["spec"].get("accessModes"),
            "capacity": {"storage": pv["spec"]["capacity"]["storage"]},
        }
        await self.api.request("PATCH", path + "/status", body={"status": status}, content_type=MERGE_PATCH)
        logger.info("bound claim %s/%s to %s", meta["namespace"], meta["name"], name)

    async def _bind_static(self, claim: JsonDict, volumes: Mapping[str, JsonDict]) -> None:
        """A claim that names its PV: the PV's ``claimRef`` is set to the claim, then both
        are bound (a problem is a ``FailedBinding`` event, once per text, and the claim waits)."""
        meta = claim["metadata"]
        pv = volumes.get(str(claim["spec"]["volumeName"]))
        problem = static_binding_problem(claim, pv)
        if problem is not None:
            key = f"{meta['uid']}:{problem}"
            if key not in self._told_unbound:
                self._told_unbound.add(key)
                await self._event(claim, "Warning", "FailedBinding", problem)
            return
        assert pv is not None
        ref = {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "namespace": meta["namespace"],
               "name": meta["name"], "uid": meta["uid"]}  # fmt: skip
        if (pv["spec"].get("claimRef") or {}) != ref:
            pv = await self.api.request("PATCH", f"/api/v1/persistentvolumes/{pv['metadata']['name']}",
                                        body={"spec": {"claimRef": ref}}, content_type=MERGE_PATCH)  # fmt: skip
        await self._bind(claim, pv)

    async def _set_phase(self, pv: JsonDict, phase: str) -> None:
        if (pv.get("status") or {}).get("phase") != phase:
            await self.api.request("PATCH", f"/api/v1/persistentvolumes/{pv['metadata']['name']}/status",
                                   body={"status": {"phase": phase}}, content_type=MERGE_PATCH)  # fmt: skip
            logger.info("%s %s", pv["metadata"]["name"], phase)

    async def _protect(self, claim: JsonDict) -> None:
        meta = claim["metadata"]
        finalizers = [*(meta.get("finalizers") or []), PVC_PROTECTION]
        path = f"/api/v1/namespaces/{meta['namespace']}/persistentvolumeclaims/{meta['name']}"
        patch = {"metadata": {"finalizers": finalizers, "resourceVersion": meta["resourceVersion"]}}
        with contextlib.suppress(ApiError):  # a conflict: the next pass adds it
            await self.api.request("PATCH", path, body=patch, content_type=MERGE_PATCH)

    async def _unprotect(self, claim: JsonDict, pods: list[JsonDict]) -> None:
        meta = claim["metadata"]
        finalizers = list(meta.get("finalizers") or [])
        if PVC_PROTECTION not in finalizers:
            return
        namespace_pods = [p for p in pods if p["metadata"].get("namespace") == meta["namespace"]]
        if claim_in_use(claim, namespace_pods):
            return  # deleted while a pod uses it: it stays until the pod is gone
        finalizers.remove(PVC_PROTECTION)
        path = f"/api/v1/namespaces/{meta['namespace']}/persistentvolumeclaims/{meta['name']}"
        patch = {"metadata": {"finalizers": finalizers, "resourceVersion": meta["resourceVersion"]}}
        with contextlib.suppress(ApiError):
            await self.api.request("PATCH", path, body=patch, content_type=MERGE_PATCH)

    async def _reclaim(self, pv: JsonDict) -> None:
        name = pv["metadata"]["name"]
        if (pv.get("status") or {}).get("phase") != "Released":
            await self.api.request("PATCH", f"/api/v1/persistentvolumes/{name}/status",
                                   body={"status": {"phase": "Released"}}, content_type=MERGE_PATCH)
            logger.info("%s released: its claim is gone", name)
        if pv["spec"].get("persistentVolumeReclaimPolicy") != "Delete":
            return
        handle = str(pv["spec"]["csi"]["volumeHandle"])
        nodes = sorted(self.in_use(handle))
        if nodes:  # a node has not unstaged it yet (its pod was deleted a moment ago)
            raise StillInUse(f"{name}: volume {handle} is still staged on {', '.join(nodes)}; deleting it afterwards")
        try:
            await self._client.call("Controller", "DeleteVolume", {"volumeId": handle}, timeout=self.timeout)
        except CsiCallError as exc:
            await self._event(pv, "Warning", "VolumeFailedDelete", str(exc))
            raise
        with contextlib.suppress(ApiError):  # gone already is fine
            await self.api.request("DELETE", f"/api/v1/persistentvolumes/{name}")
        logger.info("deleted %s (volume %s)", name, handle)
