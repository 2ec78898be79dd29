"""The built-in resource types the emulated API server serves, and kopf's peering CRDs.

Why a table: discovery, URL routing, status-subresource behaviour and ``kubectl get``
columns all derive from one description per type; listing the types our operator, the
node simulator, kopf and kubectl touch (and no others) keeps the emulator honest about
what it supports.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

_ALL_VERBS = ("create", "delete", "deletecollection", "get", "list", "patch", "update", "watch")


@dataclass(frozen=True)
class ResourceType:
    """One served (group, version, plural)."""

    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool
    singular: str = ""
    short_names: tuple[str, ...] = ()
    categories: tuple[str, ...] = ()
    status_subresource: bool = False
    # "drop": status in a create is ignored (CRs, services, pods are reset by defaults);
    # "keep": status may be set on create (nodes, as kubelets register them that way).
    status_on_create: str = "drop"
    printer_columns: tuple[dict[str, Any], ...] = field(default=())
    custom: bool = False
    verbs: tuple[str, ...] = _ALL_VERBS
    storage: tuple[str, str] | None = None  # share another resource's objects

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def key(self) -> tuple[str, str]:
        """The storage key: all versions of a resource share their objects."""
        return self.storage or (self.group, self.plural)

    @property
    def ident(self) -> tuple[str, str, str]:
        return (self.group, self.version, self.plural)

    @property
    def resource_name(self) -> str:
        """How messages name the resource: ``pods``, ``leases.coordination.k8s.io``."""
        return f"{self.plural}.{self.group}" if self.group else self.plural


def _col(name: str, path: str, type_: str = "string", priority: int = 0) -> dict[str, Any]:
    return {"name": name, "jsonPath": path, "type": type_, "priority": priority}


BUILTIN_TYPES: tuple[ResourceType, ...] = (
    ResourceType(
        "",
        "v1",
        "namespaces",
        "Namespace",
        False,
        "namespace",
        ("ns",),
        status_subresource=True,
        printer_columns=(_col("Status", ".status.phase"),),
    ),
    ResourceType(
        "",
        "v1",
        "nodes",
        "Node",
        False,
        "node",
        ("no",),
        status_subresource=True,
        status_on_create="keep",
        printer_columns=(
            _col("Ready", '.status.conditions[?(@.type=="Ready")].status'),
            _col("Internal-IP", ".status.addresses[0].address", priority=1),
        ),
    ),
    ResourceType(
        "",
        "v1",
        "pods",
        "Pod",
        True,
        "pod",
        ("po",),
        ("all",),
        status_subresource=True,
        printer_columns=(
            _col("Status", ".status.phase"),
            _col("Node", ".spec.nodeName"),
            _col("IP", ".status.podIP", priority=1),
        ),
    ),
    ResourceType(
        "",
        "v1",
        "services",
        "Service",
        True,
        "service",
        ("svc",),
        ("all",),
        status_subresource=True,
        printer_columns=(
            _col("Type", ".spec.type"),
            _col("Cluster-IP", ".spec.clusterIP"),
        ),
    ),
    # Maintained by the node simulator's endpoints controller (localcluster/services.py).
    ResourceType("", "v1", "endpoints", "Endpoints", True, "endpoints", ("ep",)),
    ResourceType(
        "discovery.k8s.io",
        "v1",
        "endpointslices",
        "EndpointSlice",
        True,
        "endpointslice",
        printer_columns=(_col("AddressType", ".addressType"),),
    ),
    ResourceType("", "v1", "secrets", "Secret", True, "secret", printer_columns=(_col("Type", ".type"),)),
    ResourceType("", "v1", "configmaps", "ConfigMap", True, "configmap", ("cm",)),
    ResourceType("", "v1", "serviceaccounts", "ServiceAccount", True, "serviceaccount", ("sa",)),
    ResourceType(
        "",
        "v1",
        "events",
        "Event",
        True,
        "event",
        ("ev",),
        printer_columns=(
            _col("Type", ".type"),
            _col("Reason", ".reason"),
            _col("Object", ".involvedObject.name"),
            _col("Message", ".message"),
        ),
    ),
    ResourceType(
        "events.k8s.io",
        "v1",
        "events",
        "Event",
        True,
        "event",
        ("ev",),
        storage=("", "events"),
        printer_columns=(
            _col("Type", ".type"),
            _col("Reason", ".reason"),
            _col("Object", ".regarding.name"),
            _col("Note", ".note"),
        ),
    ),
    ResourceType(
        "coordination.k8s.io",
        "v1",
        "leases",
        "Lease",
        True,
        "lease",
        printer_columns=(_col("Holder", ".spec.holderIdentity"),),
    ),
    # Workloads: acted on by the controllers of :mod:`pairvol.localcluster.controllers`.
    ResourceType(
        "apps",
        "v1",
        "deployments",
        "Deployment",
        True,
        "deployment",
        ("deploy",),
        ("all",),
        status_subresource=True,
        printer_columns=(
            _col("Replicas", ".spec.replicas", "integer"),
            _col("Ready", ".status.readyReplicas", "integer"),
            _col("Up-to-date", ".status.updatedReplicas", "integer"),
            _col("Available", ".status.availableReplicas", "integer"),
        ),
    ),
    ResourceType(
        "apps",
        "v1",
        "replicasets",
        "ReplicaSet",
        True,
        "replicaset",
        ("rs",),
        ("all",),
        status_subresource=True,
        printer_columns=(
            _col("Desired", ".spec.replicas", "integer"),
            _col("Current", ".status.replicas", "integer"),
            _col("Ready", ".status.readyReplicas", "integer"),
        ),
    ),
    ResourceType(
        "apps",
        "v1",
        "daemonsets",
        "DaemonSet",
        True,
        "daemonset",
        ("ds",),
        ("all",),
        status_subresource=True,
        printer_columns=(
            _col("Desired", ".status.desiredNumberScheduled", "integer"),
            _col("Current", ".status.currentNumberScheduled", "integer"),
            _col("Ready", ".status.numberReady", "integer"),
            _col("Up-to-date", ".status.updatedNumberScheduled", "integer"),
        ),
    ),
    ResourceType(
        "apps",
        "v1",
        "statefulsets",
        "StatefulSet",
        True,
        "statefulset",
        ("sts",),
        ("all",),
        status_subresource=True,
        printer_columns=(
            _col("Replicas", ".spec.replicas", "integer"),
            _col("Ready", ".status.readyReplicas", "integer"),
        ),
    ),
    ResourceType(
        "batch",
        "v1",
        "jobs",
        "Job",
        True,
        "job",
        (),
        ("all",),
        status_subresource=True,
        printer_columns=(
            _col("Completions", ".spec.completions", "integer"),
            _col("Succeeded", ".status.succeeded", "integer"),
            _col("Failed", ".status.failed", "integer"),
        ),
    ),
    # Storage: PVC-driven provisioning with the CSI driver (localcluster/csi_*.py play the
    # external-provisioner, the PV controller's binding and node-driver-registrar).
    ResourceType(
        "",
        "v1",
        "persistentvolumeclaims",
        "PersistentVolumeClaim",
        True,
        "persistentvolumeclaim",
        ("pvc",),
        status_subresource=True,
        printer_columns=(
            _col("Status", ".status.phase"),
            _col("Volume", ".spec.volumeName"),
            _col("Capacity", ".status.capacity.storage"),
            _col("StorageClass", ".spec.storageClassName"),
            _col("VolumeMode", ".spec.volumeMode", priority=1),
        ),
    ),
    ResourceType(
        "",
        "v1",
        "persistentvolumes",
        "PersistentVolume",
        False,
        "persistentvolume",
        ("pv",),
        status_subresource=True,
        printer_columns=(
            _col("Capacity", ".spec.capacity.storage"),
            _col("Reclaim Policy", ".spec.persistentVolumeReclaimPolicy"),
            _col("Status", ".status.phase"),
            _col("Claim", ".spec.claimRef.name"),
            _col("StorageClass", ".spec.storageClassName"),
            _col("VolumeMode", ".spec.volumeMode", priority=1),
        ),
    ),
    ResourceType(
        "storage.k8s.io",
        "v1",
        "storageclasses",
        "StorageClass",
        False,
        "storageclass",
        ("sc",),
        printer_columns=(
            _col("Provisioner", ".provisioner"),
            _col("ReclaimPolicy", ".reclaimPolicy"),
            _col("VolumeBindingMode", ".volumeBindingMode"),
        ),
    ),
    ResourceType(
        "storage.k8s.io",
        "v1",
        "csidrivers",
        "CSIDriver",
        False,
        "csidriver",
        printer_columns=(_col("AttachRequired", ".spec.attachRequired", "boolean"),),
    ),
    ResourceType(
        "storage.k8s.io",
        "v1",
        "csinodes",
        "CSINode",
        False,
        "csinode",
        printer_columns=(_col("Drivers", ".spec.drivers[0].name"),),
    ),
    ResourceType("rbac.authorization.k8s.io", "v1", "roles", "Role", True, "role"),
    ResourceType("rbac.authorization.k8s.io", "v1", "rolebindings", "RoleBinding", True, "rolebinding"),
    ResourceType("rbac.authorization.k8s.io", "v1", "clusterroles", "ClusterRole", False, "clusterrole"),
    ResourceType(
        "rbac.authorization.k8s.io", "v1", "clusterrolebindings", "ClusterRoleBinding", False, "clusterrolebinding"
    ),
    ResourceType("networking.k8s.io", "v1", "networkpolicies", "NetworkPolicy", True, "networkpolicy", ("netpol",)),
    ResourceType(
        "policy",
        "v1",
        "poddisruptionbudgets",
        "PodDisruptionBudget",
        True,
        "poddisruptionbudget",
        ("pdb",),
        status_subresource=True,
    ),
    ResourceType(
        "apiextensions.k8s.io",
        "v1",
        "customresourcedefinitions",
        "CustomResourceDefinition",
        False,
        "customresourcedefinition",
        ("crd", "crds"),
        status_subresource=True,
        printer_columns=(_col("Created At", ".metadata.creationTimestamp", "date"),),
    ),
)


def _peering_crd(kind: str, plural: str, scope: str) -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.kopf.dev"},
        "spec": {
            "group": "kopf.dev",
            "scope": scope,
            "names": {"kind": kind, "plural": plural, "singular": plural[:-1]},
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "properties": {
                                "status": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
                            },
                        }
                    },
                }
            ],
        },
    }


# kopf's operator peering (so several operator replicas do not fight); kopf ships the
# equivalent YAML in its docs; these are written from the documented shape.
KOPF_CRDS: tuple[dict[str, Any], ...] = (
    _peering_crd("ClusterKopfPeering", "clusterkopfpeerings", "Cluster"),
    _peering_crd("KopfPeering", "kopfpeerings", "Namespaced"),
)


# core/v1 Event field  <->  events.k8s.io/v1 Event field (both APIs share one storage,
# as in Kubernetes, so `kubectl describe` shows events written through either).
_EVENT_FIELDS = (
    ("involvedObject", "regarding"),
    ("message", "note"),
    ("count", "deprecatedCount"),
    ("firstTimestamp", "deprecatedFirstTimestamp"),
    ("lastTimestamp", "deprecatedLastTimestamp"),
    ("source", "deprecatedSource"),
    ("reportingComponent", "reportingController"),
)
_EVENT_COMMON = ("metadata", "reason", "type", "action", "related", "series", "eventTime", "reportingInstance")


def _event_as(event: dict[str, Any], api_version: str, renames: tuple[tuple[str, str], ...]) -> dict[str, Any]:
    out: dict[str, Any] = {"apiVersion": api_version, "kind": "Event"}
    out.update((key, event[key]) for key in _EVENT_COMMON if key in event)
    out.update((new, event[old]) for old, new in renames if old in event)
    return out


def event_from_core(event: dict[str, Any]) -> dict[str, Any]:
    """A stored (core/v1) Event as events.k8s.io/v1 serves it."""
    return _event_as(event, "events.k8s.io/v1", _EVENT_FIELDS)


def event_to_core(event: dict[str, Any]) -> dict[str, Any]:
    """An events.k8s.io/v1 Event in the core/v1 shape it is stored in."""
    out = _event_as(event, "v1", tuple((new, core) for core, new in _EVENT_FIELDS))
    if "source" not in out and event.get("reportingController"):
        out["source"] = {"component": event["reportingController"]}
    return out
