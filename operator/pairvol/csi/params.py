"""What a CreateVolume asks for, decided without I/O: StorageClass parameters, capacity,
access types and modes, and whether an existing volume of the same name answers the same
request.

Everything here is pure so that the rules can be read and tested on their own; the
controller and node services only translate between these values and gRPC messages.

Capacity rounding: a volume's size is the requested ``required_bytes`` rounded **up** to a
whole MiB (the agent needs a multiple of 512 bytes; whole MiB keep the file systems'
geometry simple), at least 1 MiB; without ``required_bytes`` it is ``limit_bytes`` rounded
**down** to a MiB, else 1 GiB. A range that contains no whole MiB of at least 1 MiB is
OUT_OF_RANGE.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pairvol.api.spec import MAX_VOLUME_NAME, SpecError, parse_spec

MIB = 1 << 20
DEFAULT_SIZE = 1 << 30
MIN_SIZE = MIB
# the largest volume an agent takes (its --size and POST /v1/resize: 1 PiB)
MAX_SIZE = 1 << 50

#: labels and annotations on the ReplicatedVolumes the driver creates
MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGED_BY_CSI = "pairvol-csi"
ANNOTATION_CSI_NAME = "pairvol.io/csi-name"
EXPORT_PORT = 7802

# Parameters the external-provisioner adds with --extra-create-metadata: recorded as labels.
PVC_NAME = "csi.storage.k8s.io/pvc/name"
PVC_NAMESPACE = "csi.storage.k8s.io/pvc/namespace"
PV_NAME = "csi.storage.k8s.io/pv/name"
_RESERVED_PREFIX = "csi.storage.k8s.io/"

#: the topology key of NodeGetInfo (a node's name): a volume is accessible from every node,
#: so it restricts nothing; with replicasFollowTopology its requisite values place the replicas
TOPOLOGY_KEY = "topology.pairvol.io/node"

FS_TYPES = ("ext4", "xfs")
DEFAULT_FS_TYPE = "ext4"
#: the smallest volume each file system can be made on (mkfs.xfs refuses less than 300 MiB)
MIN_FS_SIZE = {"ext4": MIN_SIZE, "xfs": 300 * MIB}

# CSI access modes (VolumeCapability.AccessMode.Mode)
SINGLE_NODE_WRITER = 1
SINGLE_NODE_SINGLE_WRITER = 6
ACCESS_MODE_NAMES = {
    0: "UNKNOWN",
    1: "SINGLE_NODE_WRITER",
    2: "SINGLE_NODE_READER_ONLY",
    3: "MULTI_NODE_READER_ONLY",
    4: "MULTI_NODE_SINGLE_WRITER",
    5: "MULTI_NODE_MULTI_WRITER",
    6: "SINGLE_NODE_SINGLE_WRITER",
    7: "SINGLE_NODE_MULTI_WRITER",
}
#: One writer on one node: the volume has one primary and the attachment is one NBD client.
SUPPORTED_ACCESS_MODES = frozenset({SINGLE_NODE_WRITER, SINGLE_NODE_SINGLE_WRITER})

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?$")


class ParameterError(ValueError):
    """The request cannot be honoured as written (INVALID_ARGUMENT); the text says what to fix."""


class CapacityError(ValueError):
    """The capacity range admits no volume size (OUT_OF_RANGE)."""


@dataclass(frozen=True)
class Capability:
    """One VolumeCapability: ``block`` or a file system (``fs_type`` may be empty = default)."""

    block: bool
    access_mode: int
    fs_type: str = ""
    mount_flags: tuple[str, ...] = ()

    @property
    def access_mode_name(self) -> str:
        return ACCESS_MODE_NAMES.get(self.access_mode, f"mode {self.access_mode}")


def access_mode_problem(cap: Capability) -> str | None:
    """Why the driver cannot give ``cap``'s access mode, or None."""
    if cap.access_mode not in SUPPORTED_ACCESS_MODES:
        return (
            f"access mode {cap.access_mode_name} is not supported: a pairvol volume has one writer "
            "on one node (use ReadWriteOnce or ReadWriteOncePod)"
        )
    return None


def fs_type_problem(cap: Capability) -> str | None:
    """Why the driver cannot make ``cap``'s file system, or None."""
    if not cap.block and cap.fs_type and cap.fs_type not in FS_TYPES:
        return f"fsType {cap.fs_type!r} is not supported; use one of {', '.join(FS_TYPES)}"
    return None


def capability_problem(cap: Capability) -> str | None:
    """Why the driver cannot serve ``cap``, or None."""
    return access_mode_problem(cap) or fs_type_problem(cap)


def volume_size(required: int, limit: int) -> int:
    """The size for a capacity range (0 = unset), by the rounding in the module docstring."""
    if required < 0 or limit < 0:
        raise CapacityError(f"capacity range must not be negative (required {required}, limit {limit})")
    if required:
        size = max(MIN_SIZE, -(-required // MIB) * MIB)
    elif limit:
        size = limit // MIB * MIB
    else:
        size = DEFAULT_SIZE
    if size < MIN_SIZE or (limit and size > limit):
        raise CapacityError(
            f"no volume size fits the capacity range (required {required} bytes, limit {limit} bytes): "
            f"sizes are whole MiB, at least {MIN_SIZE} bytes"
        )
    if size > MAX_SIZE:
        raise CapacityError(f"{size} bytes is more than the largest volume, {MAX_SIZE} bytes (1 PiB)")
    return size


def size_problem(fs_type: str, size: int) -> str | None:
    """Why a file system of ``fs_type`` cannot be made on ``size`` bytes, or None."""
    least = MIN_FS_SIZE.get(fs_type, MIN_SIZE)
    if size < least:
        return f"an {fs_type} file system needs a volume of at least {least // MIB} MiB, got {size} bytes"
    return None


def fits(size: int, required: int, limit: int) -> bool:
    """Whether an existing volume of ``size`` bytes satisfies the capacity range."""
    return size >= required and (not limit or size <= limit)


@dataclass(frozen=True)
class VolumeRequest:
    """A CreateVolume's parameters, validated: the ReplicatedVolume spec it makes and the
    default file system for the node."""

    spec: Mapping[str, Any]
    fs_type: str
    labels: Mapping[str, str]


def _seconds(key: str, raw: str, minimum: int) -> int:
    if not raw.isascii() or not raw.isdigit():
        raise ParameterError(f"parameter {key} must be a whole number of seconds, got {raw!r}")
    value = int(raw)
    if value < minimum:
        raise ParameterError(f"parameter {key} must be at least {minimum}, got {value}")
    return value


def _selector(raw: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in raw.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise ParameterError(f"parameter nodeSelector must be 'label=value,...', got {raw!r}")
        out[key.strip()] = value.strip()
    return out


#: StorageClass parameters and what they set (docs/csi.md lists them for users).
KNOWN_PARAMETERS = (
    "failoverMode",
    "checkpointIntervalSeconds",
    "peerTimeoutSeconds",
    "gracePeriodSeconds",
    "automaticFailover",
    "nodeSelector",
    "nodes",
    "hostPath",
    "reclaimPolicy",
    "fsType",
    "replicasFollowTopology",
)


def topology_nodes(requisite: Sequence[Mapping[str, str]], preferred: Sequence[Mapping[str, str]]) -> list[str]:
    """The node names of a CreateVolume's accessibility requirements (requisite, else
    preferred, each in order, without repeats); ParameterError for a segment this driver
    does not know (it reports only TOPOLOGY_KEY)."""
    nodes: list[str] = []
    for segment in requisite or preferred:
        if set(segment) != {TOPOLOGY_KEY}:
            raise ParameterError(
                f"accessibility requirement {dict(segment)} is not a topology of this driver: its nodes report "
                f"only {TOPOLOGY_KEY} (use that key in the StorageClass's allowedTopologies)"
            )
        if segment[TOPOLOGY_KEY] not in nodes:
            nodes.append(segment[TOPOLOGY_KEY])
    return nodes


def volume_request(
    name: str, size: int, parameters: Mapping[str, str], topology: Sequence[str] = (), preferred_primary: str = ""
) -> VolumeRequest:
    """Validate a CreateVolume's name and parameters into the ReplicatedVolume to create.
    ``topology``: the nodes of the request's accessibility requirements (topology_nodes);
    ``preferred_primary``: the node of their first preferred topology, where the primary
    goes if it may (a WaitForFirstConsumer claim's selected node: the pod runs there)."""
    if len(name) > MAX_VOLUME_NAME or not _DNS_LABEL.match(name):
        raise ParameterError(
            f"volume name {name!r} must be a DNS label of at most {MAX_VOLUME_NAME} characters: it names the "
            "ReplicatedVolume and its Secret (the external-provisioner's default 'pvc-<uid>' fits; keep "
            "--volume-name-prefix short and do not use --volume-name-uuid-length)"
        )
    unknown = sorted(k for k in parameters if k not in KNOWN_PARAMETERS and not k.startswith(_RESERVED_PREFIX))
    if unknown:
        raise ParameterError(
            f"unknown StorageClass parameter(s) {', '.join(unknown)}; known: {', '.join(KNOWN_PARAMETERS)}"
        )
    spec: dict[str, Any] = {"size": str(size)}
    # Checkpoint mode rolls the disk back at a failover: the node pins such a volume's
    # attachment to the primary's lineage, so that it fails instead of reconnecting to the
    # rolled-back disk (pairvol.csi.attach, docs/csi.md "Failover").
    mode = parameters.get("failoverMode", "Latest")
    failover: dict[str, Any] = {"mode": mode}
    if "gracePeriodSeconds" in parameters:
        failover["gracePeriodSeconds"] = _seconds("gracePeriodSeconds", parameters["gracePeriodSeconds"], 0)
    if "automaticFailover" in parameters:
        raw = parameters["automaticFailover"]
        if raw not in ("true", "false"):
            raise ParameterError(f"parameter automaticFailover must be 'true' or 'false', got {raw!r}")
        failover["automatic"] = raw == "true"
    if failover:
        spec["failover"] = failover
    if "checkpointIntervalSeconds" in parameters:
        spec["checkpoint"] = {
            "intervalSeconds": _seconds("checkpointIntervalSeconds", parameters["checkpointIntervalSeconds"], 0)
        }
    if "peerTimeoutSeconds" in parameters:
        timeout = _seconds("peerTimeoutSeconds", parameters["peerTimeoutSeconds"], 1)
        spec["replication"] = {"peerTimeoutSeconds": timeout}
    if "nodeSelector" in parameters:
        spec["nodeSelector"] = _selector(parameters["nodeSelector"])
    if "nodes" in parameters:
        spec["nodes"] = [n.strip() for n in parameters["nodes"].split(",") if n.strip()]
    follow = parameters.get("replicasFollowTopology", "false")
    if follow not in ("true", "false"):
        raise ParameterError(f"parameter replicasFollowTopology must be 'true' or 'false', got {follow!r}")
    if follow == "true":
        # the replicas go only where the CO's requirement allows (the StorageClass's
        # allowedTopologies): not the default, since without allowedTopologies the
        # requirement lists every node of the moment and would pin the volume to them
        if not topology:
            raise ParameterError(
                "parameter replicasFollowTopology needs accessibility requirements: set allowedTopologies on "
                f"{TOPOLOGY_KEY} in the StorageClass"
            )
        listed = spec.get("nodes")
        spec["nodes"] = [n for n in topology if listed is None or n in listed]
    if preferred_primary:
        spec["preferredPrimaryNode"] = preferred_primary
    if "hostPath" in parameters:
        spec["storage"] = {"hostPath": parameters["hostPath"]}
    # DeleteVolume is only called when the PV's reclaim policy is Delete, so by default the
    # images go with the volume; "Retain" keeps them on the nodes after DeleteVolume.
    spec["reclaimPolicy"] = parameters.get("reclaimPolicy", "Delete")
    try:
        parse_spec(spec, name=name)
    except SpecError as exc:
        raise ParameterError(f"the StorageClass parameters make an invalid volume: {'; '.join(exc.problems)}") from exc
    fs_type = parameters.get("fsType", DEFAULT_FS_TYPE)
    if fs_type not in FS_TYPES:
        raise ParameterError(f"parameter fsType {fs_type!r} is not supported; use one of {', '.join(FS_TYPES)}")
    labels = {MANAGED_BY: MANAGED_BY_CSI}
    for key, label in ((PVC_NAME, "pairvol.io/pvc-name"), (PVC_NAMESPACE, "pairvol.io/pvc-namespace")):
        value = parameters.get(key, "")
        if value and len(value) <= 63 and _LABEL_VALUE.match(value):
            labels[label] = value
    return VolumeRequest(spec=spec, fs_type=fs_type, labels=labels)


def same_request(existing: Mapping[str, Any], wanted: Mapping[str, Any]) -> list[str]:
    """How an existing volume's spec differs from the wanted one, besides its size (which
    :func:`fits` judges against the capacity range); empty = the same request."""
    try:
        have = parse_spec(existing)
        want = parse_spec(wanted)
    except SpecError as exc:
        return [f"the existing volume's spec is invalid: {exc}"]
    diffs = []
    for field in (
        "nodes",
        "node_selector",
        "checkpoint_interval_s",
        "failover_automatic",
        "failover_mode",
        "grace_period_s",
        "peer_timeout_s",
        "host_path",
        "reclaim_policy",
    ):
        if getattr(have, field) != getattr(want, field):
            diffs.append(f"{field}: existing {getattr(have, field)!r}, requested {getattr(want, field)!r}")
    return diffs


def volume_id(namespace: str, name: str) -> str:
    return f"{namespace}/{name}"


def parse_volume_id(volume_id: str) -> tuple[str, str] | None:
    """(namespace, name) of a volume ID this driver made, or None for any other string."""
    namespace, slash, name = volume_id.partition("/")
    if not slash or not _DNS_LABEL.match(namespace) or not _DNS_LABEL.match(name) or len(name) > MAX_VOLUME_NAME:
        return None
    return namespace, name


def volume_context(namespace: str, name: str, fs_type: str, failover_mode: str = "Latest") -> dict[str, str]:
    """What the node needs to attach the volume: its export (the Service that follows the
    primary), the default file system and the failover mode (a Checkpoint-mode volume's
    attachment must never cross a failover)."""
    return {
        "namespace": namespace,
        "name": name,
        "exportAddress": f"{name}.{namespace}.svc:{EXPORT_PORT}",
        "fsType": fs_type,
        "failoverMode": failover_mode,
    }


def replication_problem(volume: Mapping[str, Any]) -> str | None:
    """Why a ReplicatedVolume's replication makes its condition abnormal (OutOfSync, or
    Degraded), or None: the volume works, but one more failure can lose data or the volume."""
    status = volume.get("status") or {}
    secondary = status.get("secondary") or {}
    if secondary.get("outOfSync"):
        return (
            f"the volume's secondary on {secondary.get('node') or 'its node'} is OutOfSync: it lacks writes the "
            "primary acknowledged, so it is not promoted automatically and the primary's node is a single point of "
            "failure until the resync ends"
        )
    if status.get("phase") == "Degraded":
        why = status.get("message") or "it has no secondary"
        return f"the volume is Degraded ({why}): it has one copy until it is re-protected"
    return None


def pinned_to_lineage(context: Mapping[str, str]) -> bool:
    """Whether a volume's attachment follows only the primary's lineage (Checkpoint mode)."""
    return context.get("failoverMode") == "Checkpoint"
