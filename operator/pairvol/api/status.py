"""The ReplicatedVolume status: typed view, Kubernetes-style conditions, phase computation.

The status is the operator's durable memory (crds/replicatedvolumes.yaml holds its schema): which
pod is primary and which secondary, the fencing epoch, whether a failover is in flight. An
operator restarted at any moment rebuilds everything else from the cluster and the agents,
so this module keeps the round trip dict -> VolumeStatus -> dict lossless for those fields.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any


class Phase(enum.StrEnum):
    PENDING = "Pending"
    SYNCING = "Syncing"
    REPLICATING = "Replicating"
    DEGRADED = "Degraded"
    FAILING_OVER = "FailingOver"
    FAILED = "Failed"


def rfc3339(t: float) -> str:
    """Seconds since the epoch as an RFC 3339 UTC timestamp (what date-time fields hold)."""
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(s: str | None) -> float | None:
    """RFC 3339 timestamp -> seconds since the epoch (None stays None)."""
    if not s:
        return None
    return datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()


@dataclass(frozen=True)
class Replica:
    node: str
    pod: str
    state: str = ""
    address: str = ""
    out_of_sync: bool = False
    # Secondary only: the last full sync to it finished, so its disk is a state the volume
    # had (perhaps an old one). False from its placement until the pair is first in sync
    # after each full sync: a half-copied disk is never promoted, not even by hand.
    synced: bool = False

    def to_dict(self, secondary: bool) -> dict[str, Any]:
        d: dict[str, Any] = {
            "node": self.node,
            "pod": self.pod,
            "state": self.state,
            "address": self.address,
        }
        if secondary:
            d["outOfSync"] = self.out_of_sync
            d["synced"] = self.synced
        return d

    @staticmethod
    def from_dict(d: Mapping[str, Any] | None, secondary: bool = False) -> Replica | None:
        if not d or not d.get("pod"):
            return None
        return Replica(
            node=str(d.get("node", "")),
            pod=str(d["pod"]),
            state=str(d.get("state", "")),
            address=str(d.get("address", "")),
            out_of_sync=bool(d.get("outOfSync", False)),
            # written by operators before 'synced' existed: in sync means a finished sync
            synced=secondary and bool(d.get("synced", not d.get("outOfSync", False))),
        )


@dataclass(frozen=True)
class Failover:
    """``status.lastFailover``; ``duration_ms is None`` while the failover is in flight."""

    time: str
    from_node: str
    to_node: str
    mode: str
    reason: str
    duration_ms: float | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "time": self.time,
            "from": self.from_node,
            "to": self.to_node,
            "mode": self.mode,
            "reason": self.reason,
        }
        if self.duration_ms is not None:
            d["durationMs"] = self.duration_ms
        return d

    @staticmethod
    def from_dict(d: Mapping[str, Any] | None) -> Failover | None:
        if not d or not d.get("time"):
            return None
        dur = d.get("durationMs")
        return Failover(
            time=str(d["time"]),
            from_node=str(d.get("from", "")),
            to_node=str(d.get("to", "")),
            mode=str(d.get("mode", "Checkpoint")),
            reason=str(d.get("reason", "")),
            duration_ms=None if dur is None else float(dur),
        )


@dataclass(frozen=True)
class Restart:
    """``status.lastRestart``: the operator last asked the primary to serve again in place
    (on its own node and disk, with a new epoch) instead of promoting the secondary."""

    time: str
    pod: str
    node: str
    epoch: int
    reason: str
    # the secondary then, and whether it was promotable (in sync) before the restart marked
    # it OutOfSync: if the primary served nothing at ``epoch`` it is promotable again
    secondary: str | None = None
    secondary_in_sync: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "time": self.time,
            "pod": self.pod,
            "node": self.node,
            "epoch": self.epoch,
            "reason": self.reason,
            "secondary": self.secondary,
            "secondaryInSync": self.secondary_in_sync,
        }

    @staticmethod
    def from_dict(d: Mapping[str, Any] | None) -> Restart | None:
        if not d or not d.get("time"):
            return None
        return Restart(
            time=str(d["time"]),
            pod=str(d.get("pod", "")),
            node=str(d.get("node", "")),
            epoch=int(d.get("epoch", 0) or 0),
            reason=str(d.get("reason", "")),
            secondary=d.get("secondary") or None,
            secondary_in_sync=bool(d.get("secondaryInSync", False)),
        )


@dataclass(frozen=True)
class Condition:
    type: str
    status: str  # "True" | "False" | "Unknown"
    reason: str
    message: str
    last_transition_time: str
    observed_generation: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "status": self.status,
            "reason": self.reason,
            "message": self.message,
            "lastTransitionTime": self.last_transition_time,
            "observedGeneration": self.observed_generation,
        }

    @staticmethod
    def from_dict(d: Mapping[str, Any]) -> Condition:
        return Condition(
            type=str(d.get("type", "")),
            status=str(d.get("status", "Unknown")),
            reason=str(d.get("reason", "")),
            message=str(d.get("message", "")),
            last_transition_time=str(d.get("lastTransitionTime", "")),
            observed_generation=int(d.get("observedGeneration", 0) or 0),
        )


def set_condition(
    conditions: Sequence[Condition],
    type_: str,
    status: bool | None,
    reason: str,
    message: str,
    now: float,
    generation: int,
) -> tuple[Condition, ...]:
    """Upsert one condition; ``lastTransitionTime`` only moves when ``status`` changes."""
    st = "Unknown" if status is None else ("True" if status else "False")
    out: list[Condition] = []
    found = False
    for c in conditions:
        if c.type == type_:
            found = True
            ltt = c.last_transition_time if c.status == st else rfc3339(now)
            out.append(Condition(type_, st, reason, message, ltt, generation))
        else:
            out.append(c)
    if not found:
        out.append(Condition(type_, st, reason, message, rfc3339(now), generation))
    return tuple(out)


@dataclass(frozen=True)
class VolumeStatus:
    phase: Phase = Phase.PENDING
    message: str = ""
    epoch: int = 0
    observed_generation: int = 0
    primary: Replica | None = None
    secondary: Replica | None = None
    checkpoint: Mapping[str, Any] | None = None
    last_failover: Failover | None = None
    last_restart: Restart | None = None
    sync: Mapping[str, Any] | None = None
    # the last sync that ended in sync (kind, reason, copiedBytes, seconds, time), as the
    # primary reported it: a new one is announced with an Event once
    last_sync: Mapping[str, Any] | None = None
    endpoint: Mapping[str, Any] | None = None
    conditions: tuple[Condition, ...] = field(default_factory=tuple)
    # Every node that may hold this volume's data: a replica's node is added the moment the
    # status names it (before its pod exists) and never dropped, so reclaimPolicy Delete
    # finds the images of replicas that were replaced long ago.
    data_nodes: tuple[str, ...] = ()
    # the size both replicas have (bytes), once seen in sync; spec.size may be larger while
    # the volume grows
    size: int | None = None

    def __post_init__(self) -> None:
        nodes = set(self.data_nodes)
        nodes.update(r.node for r in (self.primary, self.secondary) if r is not None and r.node)
        if self.last_failover is not None and self.last_failover.from_node:
            nodes.add(self.last_failover.from_node)
        object.__setattr__(self, "data_nodes", tuple(sorted(nodes)))

    @property
    def activated(self) -> bool:
        """True once a primary has been told to serve (the volume holds user data)."""
        return self.endpoint is not None

    @property
    def failing_over(self) -> bool:
        return self.phase == Phase.FAILING_OVER and self.last_failover is not None

    def with_(self, **changes: Any) -> VolumeStatus:
        return replace(self, **changes)

    @staticmethod
    def from_dict(d: Mapping[str, Any] | None) -> VolumeStatus:
        d = d or {}
        try:
            phase = Phase(d.get("phase") or "Pending")
        except ValueError:
            phase = Phase.PENDING
        return VolumeStatus(
            phase=phase,
            message=str(d.get("message", "")),
            epoch=int(d.get("epoch", 0) or 0),
            observed_generation=int(d.get("observedGeneration", 0) or 0),
            primary=Replica.from_dict(d.get("primary")),
            secondary=Replica.from_dict(d.get("secondary"), secondary=True),
            checkpoint=d.get("checkpoint") or None,
            last_failover=Failover.from_dict(d.get("lastFailover")),
            last_restart=Restart.from_dict(d.get("lastRestart")),
            sync=d.get("sync") or None,
            last_sync=d.get("lastSync") or None,
            endpoint=d.get("endpoint") or None,
            conditions=tuple(Condition.from_dict(c) for c in d.get("conditions") or ()),
            data_nodes=tuple(str(n) for n in d.get("dataNodes") or () if n),
            size=int(d["size"]) if isinstance(d.get("size"), int) else None,
        )

    def to_dict(self) -> dict[str, Any]:
        """The full status for a merge patch: cleared fields are sent as ``None`` (deleted)."""
        return {
            "phase": self.phase.value,
            "message": self.message,
            "epoch": self.epoch,
            "observedGeneration": self.observed_generation,
            "primary": self.primary.to_dict(False) if self.primary else None,
            "secondary": self.secondary.to_dict(True) if self.secondary else None,
            "checkpoint": dict(self.checkpoint) if self.checkpoint else None,
            "lastFailover": self.last_failover.to_dict() if self.last_failover else None,
            "lastRestart": self.last_restart.to_dict() if self.last_restart else None,
            "sync": dict(self.sync) if self.sync else None,
            "lastSync": dict(self.last_sync) if self.last_sync else None,
            "endpoint": dict(self.endpoint) if self.endpoint else None,
            "conditions": [c.to_dict() for c in self.conditions],
            "dataNodes": list(self.data_nodes),
            "size": self.size,
        }
