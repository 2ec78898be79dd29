"""The ReplicatedVolume spec as a typed, validated value.

The CRD schema (crds/) already rejects wrong types and enums at the API server; this module
re-checks everything the operator relies on (so a lenient or old API server cannot make us
act on garbage) and adds what a schema cannot express: quantity parsing, path safety,
duplicate nodes, name lengths. All problems are collected, so one status message tells the
user everything to fix at once.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pairvol.api.quantity import QuantityError, parse_bytes
from pairvol.errors import PairvolError

GROUP = "pairvol.io"
VERSION = "v1alpha1"
PLURAL = "replicatedvolumes"
KIND = "ReplicatedVolume"

FAILOVER_MODES = ("Checkpoint", "Latest")
RECLAIM_POLICIES = ("Retain", "Delete")
MIN_SIZE = 1 << 20  # 1 MiB: smaller volumes are certainly a typo
SECTOR = 512
# 1 PiB: the largest volume an agent serves (its --size and POST /v1/resize, which take
# this constant); the CRD's CEL rule says quantity('1Pi')
MAX_SIZE = 1 << 50
# pods are named "<volume>-<epoch>-<n>" and must stay valid DNS labels (63 chars)
MAX_VOLUME_NAME = 40

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")


class SpecError(PairvolError, ValueError):
    """The spec cannot be acted on; ``problems`` lists every reason, each saying what to fix."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid ReplicatedVolume: " + "; ".join(problems))


@dataclass(frozen=True)
class VolumeSpec:
    size: int
    nodes: tuple[str, ...] = ()
    node_selector: Mapping[str, str] = field(default_factory=dict)
    #: where the first primary goes if that node is eligible ("" = no preference)
    preferred_primary: str = ""
    checkpoint_interval_s: int = 10
    failover_automatic: bool = True
    failover_mode: str = "Checkpoint"
    grace_period_s: int = 3
    peer_timeout_s: int = 5
    host_path: str = "/var/lib/pairvol"
    reclaim_policy: str = "Retain"

    @property
    def agent_failover_mode(self) -> str:
        """The agent API spells modes in lower case."""
        return self.failover_mode.lower()


def _int(problems: list[str], where: str, value: Any, default: int, minimum: int) -> int:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        problems.append(f"{where} must be an integer, got {value!r}")
        return default
    if value < minimum:
        problems.append(f"{where} must be >= {minimum}, got {value}")
        return default
    return int(value)


def _section(problems: list[str], spec: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = spec.get(key) or {}
    if not isinstance(value, Mapping):
        problems.append(f"spec.{key} must be an object, got {value!r}")
        return {}
    return value


def validate_name(name: str) -> list[str]:
    """Problems with the volume's own name (pods, Services and the Lease derive from it)."""
    if len(name) > MAX_VOLUME_NAME or not _DNS_LABEL.match(name):
        return [
            f"metadata.name {name!r} must be a DNS label of at most {MAX_VOLUME_NAME} "
            "characters (lower case letters, digits, '-'), because pod and Service names "
            "derive from it"
        ]
    return []


def parse_spec(spec: Mapping[str, Any], name: str | None = None) -> VolumeSpec:
    """Validate and default a raw ``spec``; raise :class:`SpecError` listing all problems."""
    problems: list[str] = validate_name(name) if name is not None else []
    size = 0
    raw_size = spec.get("size")
    if raw_size is None:
        problems.append("spec.size is required (e.g. size: 1Gi)")
    else:
        try:
            size = parse_bytes(raw_size)
        except QuantityError as exc:
            problems.append(f"spec.size: {exc}")
        else:
            if size < MIN_SIZE:
                problems.append(f"spec.size must be at least 1Mi, got {raw_size!r}")
            elif size > MAX_SIZE:
                problems.append(
                    f"spec.size must be at most 1Pi ({MAX_SIZE} bytes), the largest volume an agent serves, "
                    f"got {raw_size!r}; give at most 1Pi (a size beyond it is never applied: the replicas "
                    "keep the size they have)"
                )
            elif size % SECTOR:
                problems.append(f"spec.size must be a multiple of {SECTOR} bytes, got {size}")

    nodes: tuple[str, ...] = ()
    raw_nodes = spec.get("nodes")
    if raw_nodes is not None:
        if not isinstance(raw_nodes, list) or not all(isinstance(n, str) for n in raw_nodes):
            problems.append(f"spec.nodes must be a list of node names, got {raw_nodes!r}")
        else:
            nodes = tuple(raw_nodes)
            dup = sorted({n for n in nodes if nodes.count(n) > 1})
            if dup:
                problems.append(f"spec.nodes lists {', '.join(dup)} more than once")
            bad = [n for n in nodes if len(n) > 253 or not _DNS_SUBDOMAIN.match(n)]
            if bad:
                problems.append(f"spec.nodes has invalid node names: {', '.join(map(repr, bad))}")
            if 0 < len(set(nodes)) < 2:
                problems.append(
                    f"spec.nodes must name at least two distinct nodes (one per replica), got {list(nodes)}"
                )

    preferred = spec.get("preferredPrimaryNode") or ""
    if not isinstance(preferred, str) or (preferred and (len(preferred) > 253 or not _DNS_SUBDOMAIN.match(preferred))):
        problems.append(f"spec.preferredPrimaryNode must be a node name, got {preferred!r}")

    selector: dict[str, str] = {}
    raw_sel = spec.get("nodeSelector")
    if raw_sel is not None:
        if not isinstance(raw_sel, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in raw_sel.items()
        ):
            problems.append(f"spec.nodeSelector must map label names to strings, got {raw_sel!r}")
        else:
            selector = dict(raw_sel)

    cp = _section(problems, spec, "checkpoint")
    interval = _int(problems, "spec.checkpoint.intervalSeconds", cp.get("intervalSeconds"), 10, 0)

    fo = _section(problems, spec, "failover")
    automatic = fo.get("automatic", True)
    if not isinstance(automatic, bool):
        problems.append(f"spec.failover.automatic must be true or false, got {automatic!r}")
        automatic = True
    mode = fo.get("mode", "Checkpoint")
    if mode not in FAILOVER_MODES:
        problems.append(f"spec.failover.mode must be one of {', '.join(FAILOVER_MODES)}, got {mode!r}")
        mode = "Checkpoint"
    grace = _int(problems, "spec.failover.gracePeriodSeconds", fo.get("gracePeriodSeconds"), 3, 0)

    rep = _section(problems, spec, "replication")
    peer_timeout = _int(problems, "spec.replication.peerTimeoutSeconds", rep.get("peerTimeoutSeconds"), 5, 1)

    st = _section(problems, spec, "storage")
    host_path = st.get("hostPath", "/var/lib/pairvol")
    if not isinstance(host_path, str) or not host_path.startswith("/"):
        problems.append(f"spec.storage.hostPath must be an absolute path, got {host_path!r}")
        host_path = "/var/lib/pairvol"
    elif ".." in host_path.split("/") or posixpath.normpath(host_path) == "/":
        problems.append(f"spec.storage.hostPath {host_path!r} must not be '/' and must not contain '..'")
    host_path = posixpath.normpath(host_path)

    reclaim = spec.get("reclaimPolicy", "Retain")
    if reclaim not in RECLAIM_POLICIES:
        problems.append(f"spec.reclaimPolicy must be one of {', '.join(RECLAIM_POLICIES)}, got {reclaim!r}")
        reclaim = "Retain"

    if problems:
        raise SpecError(problems)
    return VolumeSpec(
        size=size,
        nodes=nodes,
        node_selector=selector,
        preferred_primary=preferred,
        checkpoint_interval_s=interval,
        failover_automatic=automatic,
        failover_mode=mode,
        grace_period_s=grace,
        peer_timeout_s=peer_timeout,
        host_path=host_path,
        reclaim_policy=reclaim,
    )
