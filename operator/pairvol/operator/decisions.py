"""Pure reconcile logic: from one observation of the world to the next status and actions.

Why pure: the hard questions of this operator (may we fail over *now*? where does the new
secondary go? what phase is the volume in?) must be answerable in unit tests without any
process, and must give the same answer after an operator restart. So the I/O layer
(handlers.py) gathers a :class:`World` — the volume's spec and status, nodes, this volume's
pods, the agents' ``/v1/status``, the primary's Lease — and :func:`plan` returns a
:class:`Plan`: the status to persist and a short list of :class:`Action` to execute.

Durability rule: the executor persists the planned status *before* running the actions.
Every action that carries a new epoch therefore has that epoch in ``status.epoch`` first, so
an operator restarted mid-action never hands out an epoch twice, and a failover in flight is
visible as ``phase: FailingOver`` with ``lastFailover`` lacking ``durationMs``.

One step per tick: the plan only does what the current observation justifies; the next tick
re-observes. Nothing here remembers anything but what is in ``World``.
"""

from __future__ import annotations

import posixpath
from collections.abc import Container, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from pairvol.api.spec import MAX_SIZE, SpecError, VolumeSpec
from pairvol.api.status import (
    Failover,
    Phase,
    Replica,
    Restart,
    VolumeStatus,
    parse_time,
    rfc3339,
    set_condition,
)
from pairvol.qemu.recipes import replication_export_name

ANN_CHECKPOINT = "pairvol.io/checkpoint"
ANN_FAILOVER = "pairvol.io/failover"
LABEL_VOLUME = "pairvol.io/volume"
LABEL_ROLE = "pairvol.io/role"

API_PORT = 7800
REPLICATION_PORT = 7801
EXPORT_PORT = 7802


# ---------------------------------------------------------------- observations


@dataclass(frozen=True)
class NodeView:
    name: str
    ready: bool = True
    schedulable: bool = True
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class PodView:
    name: str
    node: str
    role: str = ""  # value of the pairvol.io/role label
    phase: str = "Pending"  # Pending | Running | Succeeded | Failed | Unknown
    ready: bool = False
    ip: str = ""
    deleting: bool = False
    reason: str = ""  # why the container is not running (terminated/waiting reason)


@dataclass(frozen=True)
class AgentView:
    """One agent's ``GET /v1/status`` (DESIGN.md §3)."""

    role: str
    stage: str
    epoch: int
    replication_state: str = "none"
    peer: str | None = None
    error: str | None = None
    checkpoint: Mapping[str, Any] | None = None
    sync_done: int | None = None
    sync_total: int | None = None
    sync_kind: str | None = None  # full | bitmap | checksum | ... (whatever the agent chose)
    sync_reason: str | None = None  # why the agent chose that kind
    last_sync: Mapping[str, Any] | None = None  # replication.lastSync: the last sync that ended in sync
    # replication.reprotect.nextInSeconds is set: the primary will re-pair with its dropped
    # peer on its own (docs/correctness.md R5); the operator leaves it to it meanwhile
    reprotecting: bool = False
    serving: bool = False  # export.serving: the workload export is up
    disk_id: str | None = None  # disk.id: the identity of a secondary's disk content
    tracked_disk: str | None = None  # replication.resync.peerDisk: the peer disk a primary knows about
    size: int | None = None  # the replica's size in bytes (it grows with POST /v1/resize)
    # export.fencedBy: what stopped a primary's workload export (lease | data-path |
    # local-disk | shutdown); disk.localFailure: its local disk failed a request the peer
    # served (the disk is no longer whole); qsd.alive: its daemon runs
    fenced_by: str | None = None
    local_failure: str | None = None
    daemon_alive: bool = True
    # export.refusedEpoch: a start as primary at this epoch refused to serve (no Lease) and
    # served nothing; equal to ``epoch``, the replica has served nothing at its epoch
    refused_epoch: int | None = None
    # replication.outOfSync: the primary's own durable record that it acknowledged writes its
    # peer lacks (written before the first such acknowledgement, cleared once in sync again)
    peer_out_of_sync: bool = False
    # busy: a command holds the agent's replica lock — a start that has saved its epoch may
    # still take the Lease and serve (it may come from an operator process that has since died)
    busy: bool = False
    # replication.link.export: the export a primary's link asked its peer for; it names the
    # incarnation of the peer (the epoch that secondary was started at), the address does not
    link_export: str | None = None
    # replication.link.serial: the serial of that link, reported only while it is in sync;
    # a cut names it, and the secondary refuses the cut once a primary linked again (S5)
    link_serial: str | None = None
    sync_compared: int | None = None  # a checksum resync: bytes of the volume compared so far
    # failoverTriggers is listed: POST /v1/failover takes a "trigger" (older agents refuse it)
    takes_trigger: bool = False

    @staticmethod
    def from_status(d: Mapping[str, Any]) -> AgentView:
        rep = d.get("replication") or {}
        sync = d.get("sync") or rep.get("sync") or {}
        return AgentView(
            role=str(d.get("role", "none")),
            stage=str(d.get("stage", "none")),
            epoch=int(d.get("epoch", 0) or 0),
            replication_state=str(rep.get("state", "none")),
            peer=rep.get("peer"),
            error=rep.get("error"),
            checkpoint=d.get("checkpoint") or None,
            sync_done=sync.get("doneBytes"),
            sync_total=sync.get("totalBytes"),
            sync_kind=sync.get("kind"),
            sync_reason=sync.get("reason"),
            sync_compared=sync.get("comparedBytes"),
            last_sync=rep.get("lastSync") or None,
            reprotecting=(rep.get("reprotect") or {}).get("nextInSeconds") is not None,
            serving=bool((d.get("export") or {}).get("serving", False)),
            disk_id=(d.get("disk") or {}).get("id"),
            tracked_disk=(rep.get("resync") or {}).get("peerDisk"),
            size=d["size"] if isinstance(d.get("size"), int) else None,
            fenced_by=(d.get("export") or {}).get("fencedBy"),
            local_failure=(d.get("disk") or {}).get("localFailure"),
            daemon_alive=bool((d.get("qsd") or {}).get("alive", True)),
            refused_epoch=(d.get("export") or {}).get("refusedEpoch"),
            peer_out_of_sync=bool(rep.get("outOfSync", False)),
            busy=bool(d.get("busy", False)),
            link_export=(rep.get("link") or {}).get("export"),
            link_serial=(rep.get("link") or {}).get("serial"),
            takes_trigger=isinstance(d.get("failoverTriggers"), list),
        )


@dataclass(frozen=True)
class LeaseView:
    """The primary's Lease as this operator has observed it.

    ``observed_age_s``: how long the operator has seen the *same* record (holder, renewTime,
    resourceVersion), measured with its own monotonic clock from its first look at that
    record (pairvol.kube.lease.LeaseObservation). The holder's renewTime is never compared
    with the operator's wall clock: the nodes' clocks may differ by any amount. An operator
    that has just started has seen the record for 0 s and waits a full duration.
    """

    holder: str | None
    observed_age_s: float
    duration_s: float | None
    out_of_sync_epoch: int | None = None
    # the primary is resyncing its secondary on its own at this epoch (pairvol.io/resync):
    # the secondary's disk is a partial copy until the mark is cleared
    resync_epoch: int | None = None
    # the operator's wall time at which observed_age_s held (when the read was made);
    # None: the World's ``now``
    observed_at: float | None = None

    def expired(self, margin_s: float) -> bool:
        """True when nobody can still believe to hold the lease."""
        if not self.holder or self.duration_s is None:
            return True
        return self.observed_age_s > self.duration_s + margin_s

    def expires_in(self, margin_s: float) -> float:
        if not self.holder or self.duration_s is None:
            return 0.0
        return max(0.0, self.duration_s + margin_s - self.observed_age_s)


@dataclass(frozen=True)
class Settings:
    lease_margin_s: float = 1.0
    # a primary restarted in place that loses its Lease again within this long is failed
    # over: whatever keeps it from renewing did not pass. 0: never restarted in place by choice
    restart_in_place_window_s: float = 60.0
    # a status write that only refreshes checkpoint/sync/state waits at least this long
    min_status_interval_s: float = 1.0
    # re-protection waits for the failovers of other volumes at most this long
    # (:func:`reprotect_hold`); 0: it never waits
    reprotect_hold_max_s: float = 30.0


@dataclass(frozen=True)
class VolumeDir:
    """Another ReplicatedVolume's data directory on the nodes (``World.volume_dirs``): where
    its replicas keep their files, and what its deletion with ``reclaimPolicy: Delete``
    removes on each node of ``data_nodes``."""

    key: str  # namespace/name
    path: str  # <hostPath>/<namespace>/<name> (data_dir_of)
    created: float  # its creationTimestamp, seconds since the epoch
    placed: bool = False  # it has replicas (a primary in its status, or just placed by this operator)
    data_nodes: tuple[str, ...] = ()  # where it may hold data (status.dataNodes)


@dataclass(frozen=True)
class World:
    name: str
    namespace: str
    generation: int
    spec: VolumeSpec | SpecError
    status: VolumeStatus
    now: float
    annotations: Mapping[str, str] = field(default_factory=dict)
    nodes: Sequence[NodeView] = ()
    pods: Mapping[str, PodView] = field(default_factory=dict)  # this volume's pods by name
    agents: Mapping[str, AgentView | None] = field(default_factory=dict)  # pod -> status or None
    lease: LeaseView | None = None
    # operator memory (not durable): pod name -> first time it was seen unhealthy
    suspect_since: Mapping[str, float] = field(default_factory=dict)
    # replicas of *other* volumes per node, for spreading
    placement: Mapping[str, int] = field(default_factory=dict)
    settings: Settings = field(default_factory=Settings)
    # an agent role call (secondary/primary start, which may run for long) is still in flight:
    # no new one is planned until it has answered
    agent_call_in_flight: bool = False
    # this volume's creationTimestamp and the other volumes' data directories, filled in while
    # it has no primary: a data directory nested in another's is not placed (data_dir_conflict)
    created: float = 0.0
    volume_dirs: Sequence[VolumeDir] = ()
    # how many *other* volumes of this operator are failing over right now, or are about to
    # (the last plan of their loop said so: ``Plan.failing_over``); re-protection waits for them
    failovers_elsewhere: int = 0
    # operator memory (not durable): since when this volume's re-protection has waited for
    # them (``next_reprotect_held_since``); past ``Settings.reprotect_hold_max_s`` it goes on
    reprotect_held_since: float | None = None

    def node(self, name: str) -> NodeView | None:
        return next((n for n in self.nodes if n.name == name), None)


# --------------------------------------------------------------------- actions


@dataclass(frozen=True)
class CreatePod:
    pod: str
    node: str
    role: str


@dataclass(frozen=True)
class DeletePod:
    pod: str
    reason: str


@dataclass(frozen=True)
class SetRole:
    pod: str
    role: str


@dataclass(frozen=True)
class StartSecondary:
    pod: str
    address: str
    epoch: int


@dataclass(frozen=True)
class StartPrimary:
    pod: str
    address: str
    epoch: int
    peer: str | None
    sync: str  # "none" | "full" | "auto"
    peer_epoch: int | None = None  # the epoch the peer runs as secondary (its export's name)
    peer_disk: str | None = None  # the identity of the peer's disk, as its agent reports it
    peer_api: str | None = None  # the peer agent's API: where a checksum resync asks for digests


@dataclass(frozen=True)
class Checkpoint:
    pod: str
    address: str
    # the primary's link serial as seen in sync (docs/correctness.md S5): the secondary cuts
    # only if no primary linked to it since; None (a primary that reports none): no check
    link_serial: str | None = None


@dataclass(frozen=True)
class DoFailover:
    pod: str
    address: str
    epoch: int
    mode: str  # agent spelling: checkpoint | latest
    # "automatic" or "manual": labels the agent's failover metrics (docs/alerts.md); None for
    # an agent that does not take it (an older one refuses fields it does not know)
    trigger: str | None = None


@dataclass(frozen=True)
class Grow:
    """Grow both replicas to ``size`` (docs/correctness.md E0-E5), in this order: the
    primary lets go of its secondary (a planned detach that records what the secondary
    misses), the secondary grows, the primary grows. The resync that pairs them again is
    the ordinary re-protection that follows."""

    primary_pod: str
    primary_address: str
    primary_epoch: int
    secondary_pod: str
    secondary_address: str
    secondary_epoch: int
    size: int


@dataclass(frozen=True)
class ClearAnnotation:
    key: str


@dataclass(frozen=True)
class Event:
    type: str  # Normal | Warning
    reason: str
    message: str


@dataclass(frozen=True)
class FailoverDone:
    """Bookkeeping for metrics: a failover completed (the event says the rest)."""

    duration_s: float
    mode: str
    reason: str


@dataclass(frozen=True)
class RestartedInPlace:
    """Bookkeeping for metrics: the primary was asked to serve again in place, because it
    lost only its Lease (``lease-lost``, H10) or because no replica could be promoted
    (``no-failover``, H9)."""

    trigger: str


Action = (
    CreatePod
    | DeletePod
    | SetRole
    | StartSecondary
    | StartPrimary
    | Checkpoint
    | DoFailover
    | Grow
    | ClearAnnotation
    | Event
    | FailoverDone
    | RestartedInPlace
)


@dataclass(frozen=True)
class Plan:
    status: VolumeStatus
    actions: tuple[Action, ...] = ()
    # True if only informational fields changed (checkpoint, sync, states): may be coalesced
    cosmetic: bool = False
    # this volume is failing over, or its primary is judged down and nothing but time (its
    # grace period, its Lease running out) stands between it and a promotion: the
    # re-protection of other volumes waits (``World.failovers_elsewhere``)
    failing_over: bool = False
    # a step of re-protection was held back for the failovers of other volumes (reprotect_hold)
    reprotect_held: bool = False


def acts_on_pods(actions: Iterable[Action]) -> bool:
    """Whether a plan creates, deletes or relabels a pod: steps no agent checks against an
    epoch, taken on the view of the status the plan was made from. Such a plan is stored (a
    write conditional on that version) even when its status did not change (H19)."""
    return any(isinstance(a, (CreatePod, DeletePod, SetRole)) for a in actions)


# ------------------------------------------------------------------ scheduling


def pod_name(volume: str, epoch: int) -> str:
    """Agent pods are named after the epoch at which they were placed: never reused."""
    return f"{volume}-{epoch}"


def eligible_nodes(spec: VolumeSpec, nodes: Sequence[NodeView]) -> list[NodeView]:
    """Nodes a replica may run on: ready, schedulable, listed (if a list is given), selected."""
    out = []
    for n in nodes:
        if not (n.ready and n.schedulable):
            continue
        if spec.nodes and n.name not in spec.nodes:
            continue
        if any(n.labels.get(k) != v for k, v in spec.node_selector.items()):
            continue
        out.append(n)
    return out


def rank_nodes(candidates: Sequence[NodeView], placement: Mapping[str, int], prefer: Sequence[str] = ()) -> list[str]:
    """Preferred nodes first (in order), then the least loaded, ties by name (deterministic)."""
    names = [n.name for n in candidates]
    preferred = [p for p in prefer if p in names]
    rest = sorted((n for n in names if n not in preferred), key=lambda n: (placement.get(n, 0), n))
    return preferred + rest


def choose_pair(spec: VolumeSpec, nodes: Sequence[NodeView], placement: Mapping[str, int]) -> tuple[str, str] | str:
    """Two distinct nodes for primary and secondary, or a message saying why there are none.
    The primary goes to ``spec.preferredPrimaryNode`` when that node is eligible."""
    ranked = rank_nodes(eligible_nodes(spec, nodes), placement, (spec.preferred_primary,))  # "" is no node
    if len(ranked) < 2:
        why = []
        if spec.nodes:
            why.append(f"spec.nodes={list(spec.nodes)}")
        if spec.node_selector:
            why.append(f"nodeSelector={dict(spec.node_selector)}")
        ready = [n.name for n in nodes if n.ready and n.schedulable]
        return (
            f"need two eligible nodes, found {len(ranked)} ({', '.join(ranked) or 'none'}) "
            f"among ready nodes {ready}"
            + (f" with {' and '.join(why)}" if why else "")
            + "; add or label nodes, or widen spec.nodes/nodeSelector"
        )
    return ranked[0], ranked[1]


def data_dir_of(host_path: str, namespace: str, name: str) -> str:
    """A volume's data directory on the nodes (pairvol.operator.manifests.data_dir)."""
    return posixpath.normpath(f"{host_path}/{namespace}/{name}")


def _components(path: str) -> tuple[str, ...]:
    return tuple(c for c in posixpath.normpath(path).split("/") if c not in ("", "."))


def dir_relation(a: str, b: str) -> str | None:
    """How directory ``a`` lies to ``b``: ``"same"``, ``"inside"``, ``"contains"``, or None
    (apart). Compared component by component: /a/bc is not inside /a/b."""
    ca, cb = _components(a), _components(b)
    if ca == cb:
        return "same"
    if ca[: len(cb)] == cb:
        return "inside"
    if cb[: len(ca)] == ca:
        return "contains"
    return None


def data_dir_conflict(world: World, spec: VolumeSpec) -> str | None:
    """Why this volume may not place replicas: its data directory is, contains or lies inside
    another volume's (None: it is apart from all). Two volumes there would share files, and
    the wipe of one (``reclaimPolicy: Delete`` removes the whole directory on its nodes)
    would remove the other's replicas.

    Of two such volumes the one that has replicas keeps them, and otherwise the one created
    first (creationTimestamp, then namespace/name) places: every tick of either volume,
    whichever operator runs it, agrees on which one waits. The other places nothing until its
    ``hostPath`` is changed or that volume is gone."""
    own = data_dir_of(spec.host_path, world.namespace, world.name)
    me = (world.created, f"{world.namespace}/{world.name}")
    for other in sorted(world.volume_dirs, key=lambda o: (not o.placed, o.created, o.key)):
        how = dir_relation(own, other.path)
        if other.key == me[1] or how is None or not (other.placed or (other.created, other.key) < me):
            continue
        where = {
            "same": f"its data directory {own} is also the data directory of ReplicatedVolume {other.key}",
            "inside": f"its data directory {own} lies inside {other.path}, the data directory of "
            f"ReplicatedVolume {other.key}",
            "contains": f"its data directory {own} contains {other.path}, the data directory of "
            f"ReplicatedVolume {other.key}",
        }[how]
        first = "which has replicas" if other.placed else "which was created first"
        return (
            f"no replica placed: {where} ({first}); the two would share files, and deleting either "
            "with reclaimPolicy Delete would remove the other's data. Delete this volume and create it "
            "again with another spec.storage.hostPath (the field cannot change), one whose "
            "<hostPath>/<namespace>/<name> neither contains nor lies inside another volume's"
        )
    return None


def wipe_would_remove(own: str, node: str, others: Iterable[VolumeDir]) -> VolumeDir | None:
    """The other volume whose data a wipe of data directory ``own`` on ``node`` would remove:
    its data directory is ``own`` or lies inside it, and it may hold data on that node (None:
    the wipe removes only this volume's files). A volume refused by
    :func:`data_dir_conflict` never placed replicas, so it holds no data the wipe of the
    volume it nests in could remove."""
    for other in others:
        if node in other.data_nodes and dir_relation(other.path, own) in ("same", "inside"):
            return other
    return None


# ---------------------------------------------------------------------- health


def replica_health(world: World, rep: Replica, grace_s: float, started: bool) -> tuple[str, str]:
    """("ok" | "suspect" | "dead", reason) for a replica's pod, node and agent.

    ``started``: the agent has been given a role, so not-ready now means trouble (before
    that, a pending pod is just starting).
    """
    pod = world.pods.get(rep.pod)
    if pod is None:
        return "dead", f"pod {rep.pod} is gone"
    if pod.deleting:
        return "dead", f"pod {rep.pod} is being deleted"
    if pod.phase in ("Failed", "Succeeded"):
        return "dead", f"pod {rep.pod} has terminated (phase {pod.phase})"
    node = world.node(pod.node)
    if node is None:
        return "dead", f"node {pod.node} of pod {rep.pod} no longer exists"
    if not node.ready:
        return "dead", f"node {pod.node} is NotReady"
    agent = world.agents.get(rep.pod)
    if pod.ready and agent is not None:
        return "ok", ""
    if not started:
        return "suspect", f"pod {rep.pod} is not ready yet"
    since = world.suspect_since.get(rep.pod, world.now)
    what = "not ready" if not pod.ready else "not answering on its API"
    if world.now - since >= grace_s:
        return "dead", f"pod {rep.pod} {what} for {world.now - since:.1f}s"
    return "suspect", f"pod {rep.pod} {what}"


def _agent(world: World, rep: Replica | None) -> AgentView | None:
    return None if rep is None else world.agents.get(rep.pod)


def _pod_ip(world: World, rep: Replica) -> str:
    pod = world.pods.get(rep.pod)
    return pod.ip if pod is not None and pod.ip else rep.address


def _state(world: World, rep: Replica) -> str:
    a = world.agents.get(rep.pod)
    if a is not None:
        return f"{a.role}/{a.replication_state}" if a.role == "primary" else f"{a.role}/{a.stage}"
    pod = world.pods.get(rep.pod)
    if pod is None:
        return "Gone"
    return pod.phase if pod.ready or pod.phase != "Running" else "NotReady"


def _checkpoint_status(cp: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if not cp or cp.get("id") is None:
        return None
    t = cp.get("time")
    if isinstance(t, int | float):
        t = rfc3339(float(t))
    return {"id": int(cp["id"]), "time": t, "durationMs": float(cp.get("durationMs") or 0.0)}


def linked_to(pa: AgentView, sa: AgentView) -> bool:
    """Whether the primary's link goes to this very incarnation of the secondary
    (docs/correctness.md H14): the export it asked for carries the epoch that secondary was
    started at (``replication_export_name``, alone or followed by the disk's identity).

    The peer's address says nothing about that: a secondary placed again on the same node
    often gets the address of the one before, and a primary whose peer died while no write
    came keeps reporting that address as replicating until its next write. A primary that
    reports no link is not linked."""
    if pa.link_export is None or sa.role != "secondary":
        return False
    name = replication_export_name(sa.epoch)
    return pa.link_export == name or pa.link_export.startswith(f"{name}-d")


def marks_floor(world: World) -> int:
    """The oldest epoch whose marks on the Lease (out-of-sync, resync) concern the current
    pair: the primary's own epoch as its agent reports it. A primary writes its marks at its
    epoch, and every start that pairs it anew (a new epoch) marks the secondary OutOfSync in
    status itself, so marks from before its last start say nothing new; but the volume's
    epoch also rises without a start of the primary (a secondary placed or started), and
    marks the primary wrote at its older epoch still count then (H14). Without an answer
    from the primary's agent, the volume's epoch: every step that raises it past the
    primary's marks the secondary OutOfSync or replaces it, so an in-sync secondary in
    status was in sync at the volume's epoch."""
    st = world.status
    pa = _agent(world, st.primary)
    if pa is not None and pa.role == "primary":
        return min(pa.epoch, st.epoch)
    return st.epoch


def failover_blocker(world: World, spec: VolumeSpec, st: VolumeStatus, manual: bool) -> str | None:
    """Why the secondary may not be promoted now (None: it may). Order = what to fix first."""
    sec = st.secondary
    if sec is None:
        return "there is no secondary to fail over to"
    lease = world.lease
    if lease is not None and lease.resync_epoch is not None and lease.resync_epoch >= marks_floor(world):
        return (
            f"the primary was resyncing secondary {sec.pod} on its own (epoch {lease.resync_epoch}): its disk is "
            "a partial copy, a state the volume never had, and is not promoted even by hand. The primary "
            "is restarted on its node once that node is Ready; the volume resumes from the primary's data"
        )
    if not sec.synced:
        return (
            f"secondary {sec.pod} never finished its full sync: its disk is a partial copy, a state the "
            "volume never had, and is not promoted even by hand. The primary is restarted on its node "
            "once that node is Ready; the volume resumes from the primary's data"
        )
    if not manual and not spec.failover_automatic:
        return "spec.failover.automatic is false; annotate pairvol.io/failover=now to fail over"
    if sec.out_of_sync and not manual:
        return (
            f"secondary {sec.pod} is OutOfSync (it missed acknowledged writes) and is never "
            "promoted automatically; annotate pairvol.io/failover=now to accept the data loss"
        )
    health, why = replica_health(world, sec, spec.grace_period_s, started=True)
    if health != "ok":
        return f"secondary is unhealthy: {why}"
    agent = world.agents[sec.pod]
    assert agent is not None
    if agent.role != "secondary" or agent.stage != "running":
        return f"secondary agent is {agent.role}/{agent.stage}, not secondary/running"
    if lease is not None and not lease.expired(world.settings.lease_margin_s):
        return (
            f"waiting for lease held by {lease.holder} to expire (unchanged for {lease.observed_age_s:.1f}s; "
            f"{lease.expires_in(world.settings.lease_margin_s):.1f}s to go)"
        )
    return None


# ------------------------------------------------------------------------ plan


def _finish(
    world: World,
    status: VolumeStatus,
    actions: list[Action],
    cosmetic: bool,
    *,
    failover_coming: bool = False,
    reprotect_held: bool = False,
) -> Plan:
    """Fill in replica states, phase conditions and observedGeneration. ``failover_coming``:
    the primary is down and only time stands between it and a promotion (a failover under
    way counts anyway, by its phase); ``reprotect_held``: see :func:`reprotect_hold`."""
    now, gen = world.now, world.generation
    conds = status.conditions
    ready = status.phase in (Phase.REPLICATING, Phase.DEGRADED, Phase.SYNCING)
    conds = set_condition(
        conds,
        "Ready",
        ready,
        status.phase.value,
        status.message or ("primary serving" if ready else status.phase.value),
        now,
        gen,
    )
    in_sync = status.phase == Phase.REPLICATING
    conds = set_condition(
        conds,
        "Replicating",
        in_sync,
        "InSync" if in_sync else "NotInSync",
        "secondary is in sync" if in_sync else status.message,
        now,
        gen,
    )
    # a spec the status does not yet acknowledge is news for whoever changed it (kubectl
    # wait --for=jsonpath='{.status.observedGeneration}'), not a refresh to coalesce
    cosmetic = cosmetic and status.observed_generation == gen
    status = status.with_(conditions=conds, observed_generation=gen)
    return Plan(
        status=status,
        actions=tuple(actions),
        cosmetic=cosmetic,
        failing_over=failover_coming or status.failing_over,
        reprotect_held=reprotect_held,
    )


def plan(world: World) -> Plan:
    st = world.status
    actions: list[Action] = []

    if isinstance(world.spec, SpecError):
        msg = str(world.spec)
        if st.phase != Phase.FAILED or st.message != msg:
            actions.append(Event("Warning", "InvalidSpec", msg))
        return _finish(world, st.with_(phase=Phase.FAILED, message=msg), actions, False)
    spec = world.spec

    # first: an action that fails stops those after it, and this one is what the workload reaches
    actions += role_labels(world)

    # garbage: pods of this volume that are neither the primary nor the secondary
    keep = {r.pod for r in (st.primary, st.secondary) if r is not None}
    for pod in world.pods.values():
        if pod.name not in keep and not pod.deleting:
            actions.append(DeletePod(pod.name, "no longer a replica of this volume"))

    if st.failing_over:
        return _resume_failover(world, spec, st, actions)

    if failover_unresolved(st):
        return _target_lost(world, spec, st, actions)

    if st.primary is None:
        return _initial_placement(world, spec, st, actions)

    if not st.activated:
        return _bring_up(world, spec, st, actions)

    lost = bring_up_start_lost(world)
    if lost is not None:
        actions.append(Event("Warning", "BringUpResumed", lost))
        return _bring_up(world, spec, st.with_(endpoint=None, message=lost), actions)

    return _steady(world, spec, st, actions)


def role_labels(world: World) -> list[Action]:
    """The ``pairvol.io/role`` label patches this tick needs: the status's primary labelled
    ``primary``, its secondary not (docs/correctness.md H18). Only labels that differ from
    what the pods carry are patched, so a volume whose labels are right costs no call.

    Planned on every tick, not once: the workload Service selects the label (the CSI's
    export address is that Service), and the tick that records a failover as done persists
    the new primary before it patches the label. Planned only there, a patch that failed,
    or an operator that stopped right after the write, would leave the Service selecting
    no pod until the next failover.
    A pod the status does not name is deleted (the garbage rule of :func:`plan`). A pod that
    does not run (pending, ended, being deleted) is no endpoint: it is labelled once it runs."""
    st = world.status
    out: list[Action] = []
    for rep, role in ((st.primary, "primary"), (st.secondary, "secondary")):
        pod = None if rep is None else world.pods.get(rep.pod)
        if pod is None or pod.deleting or pod.phase != "Running":
            continue
        if pod.role != role and (role == "primary" or pod.role == "primary"):
            out.append(SetRole(pod.name, role))
    return out


def bring_up_start_lost(world: World) -> str | None:
    """Why the bring-up's start of the primary never reached its agent, so that the volume
    is not activated after all (None: it did, or that cannot be told). docs/correctness.md
    H12.

    The bring-up persists the activation (the endpoint) with the plan that sends
    ``POST /v1/primary``, before the call. An operator that stops in between (a crash, a
    lost leadership) leaves an activated volume whose primary's agent never got the call:
    no role, no epoch, nothing under way. Judged by the steady rules it is a primary without
    the role on record, which H9 never asks to serve (a wiped data dir is not the volume's):
    the volume stayed down for good. But such a replica provably served nothing — a start
    saves its role and epoch before it links the peer or serves, takes the Lease before it
    serves, and says ``busy`` while it runs — and the secondary was never in sync, so
    nothing was ever acknowledged: the volume is not activated after all, and the bring-up
    goes on, at a new epoch.
    """
    st = world.status
    prim, sec = st.primary, st.secondary
    if prim is None or sec is None or sec.synced or world.agent_call_in_flight:
        return None
    if st.last_failover is not None or st.last_restart is not None or world.lease is not None:
        return None
    pa = _agent(world, prim)
    if pa is None or pa.role != "none" or pa.epoch != 0 or pa.busy:
        return None
    return (
        f"the start of primary {prim.pod} (epoch {st.epoch}) never reached its agent (no role, no epoch, no "
        "Lease, nothing under way: it served nothing); resuming the bring-up"
    )


def _initial_placement(world: World, spec: VolumeSpec, st: VolumeStatus, actions: list[Action]) -> Plan:
    clash = data_dir_conflict(world, spec)
    if clash is not None:
        if st.message != clash:
            actions.append(Event("Warning", "DataDirConflict", clash))
        return _finish(world, st.with_(phase=Phase.PENDING, message=clash), actions, False)
    pair = choose_pair(spec, world.nodes, world.placement)
    if isinstance(pair, str):
        if st.message != pair:
            actions.append(Event("Warning", "NotEnoughNodes", pair))
        return _finish(world, st.with_(phase=Phase.PENDING, message=pair), actions, False)
    epoch = st.epoch + 1
    primary = Replica(node=pair[0], pod=pod_name(world.name, epoch) + "-a", state="Placed")
    secondary = Replica(node=pair[1], pod=pod_name(world.name, epoch) + "-b", state="Placed", out_of_sync=True)
    actions += [
        CreatePod(primary.pod, primary.node, "primary"),
        CreatePod(secondary.pod, secondary.node, "secondary"),
        Event("Normal", "Scheduled", f"primary on {primary.node}, secondary on {secondary.node}"),
    ]
    st = st.with_(
        phase=Phase.PENDING,
        epoch=epoch,
        primary=primary,
        secondary=secondary,
        message=f"starting agents on {primary.node} and {secondary.node}",
    )
    return _finish(world, st, actions, False)


def _bring_up(world: World, spec: VolumeSpec, st: VolumeStatus, actions: list[Action]) -> Plan:
    """Before the first primary serves: no data yet, so any broken pod is simply replaced."""
    assert st.primary is not None
    reps: dict[str, Replica | None] = {"primary": st.primary, "secondary": st.secondary}
    for role, rep in list(reps.items()):
        if rep is None:
            continue
        pod = world.pods.get(rep.pod)
        node = world.node(rep.node)
        # a pod that ended (its agent stopped by a failed liveness probe exits 0, so the
        # pod is Succeeded, not Failed) never becomes ready: replace it too
        if node is None or not node.ready or (pod is not None and pod.phase in ("Failed", "Succeeded")):
            # start over on a fresh pair: nothing was ever written
            if node is None or not node.ready:
                why = f"node {rep.node} is not ready"
            else:
                assert pod is not None
                what = "failed" if pod.phase == "Failed" else "ended"
                why = f"pod {pod.name} {what}" + (f" ({pod.reason})" if pod.reason else "")
            for r in reps.values():
                if r is not None and r.pod in world.pods:
                    actions.append(DeletePod(r.pod, f"bring-up restarted: {why}"))
            st = st.with_(primary=None, secondary=None, message=f"{role} failed during bring-up: {why}")
            actions.append(Event("Warning", "BringUpRestarted", st.message))
            return _finish(world, st.with_(phase=Phase.PENDING), actions, False)
        if pod is None:
            actions.append(CreatePod(rep.pod, rep.node, role))
    prim, sec = st.primary, st.secondary
    assert prim is not None and sec is not None
    pa, sa = _agent(world, prim), _agent(world, sec)
    st = st.with_(
        primary=Replica(prim.node, prim.pod, _state(world, prim), _pod_ip(world, prim)),
        secondary=Replica(sec.node, sec.pod, _state(world, sec), _pod_ip(world, sec), True),
    )
    ppod, spod = world.pods.get(prim.pod), world.pods.get(sec.pod)
    if pa is None or sa is None or ppod is None or spod is None or not (ppod.ready and spod.ready):
        st = st.with_(phase=Phase.PENDING, message="waiting for both agents to become ready")
        return _finish(world, st, actions, False)
    if world.agent_call_in_flight:
        st = st.with_(phase=Phase.PENDING, message="waiting for an agent to answer")
        return _finish(world, st, actions, False)
    if sa.role != "secondary":
        epoch = st.epoch + 1
        actions.append(StartSecondary(sec.pod, spod.ip, epoch))
        return _finish(world, st.with_(epoch=epoch, phase=Phase.PENDING), actions, False)
    epoch = st.epoch + 1
    endpoint = _endpoint(world, spec, prim)
    # naming the secondary's disk lets the primary record it: a later outage is then resynced
    # with only what the secondary missed; naming its agent's API lets the primary have it
    # end older replication connections before each link, its own re-protections too (R5)
    actions.append(
        StartPrimary(
            prim.pod, ppod.ip, epoch, f"{spod.ip}:{REPLICATION_PORT}", "full", sa.epoch, sa.disk_id,
            f"{spod.ip}:{API_PORT}",
        )
    )
    actions.append(
        Event(
            "Normal",
            "PrimaryStarted",
            f"{prim.pod} on {prim.node} is primary (epoch {epoch}), full sync to {sec.pod} on {sec.node}",
        )
    )
    st = st.with_(epoch=epoch, endpoint=endpoint, phase=Phase.SYNCING, message=f"full sync {prim.node} -> {sec.node}")
    return _finish(world, st, actions, False)


def _endpoint(world: World, spec: VolumeSpec, prim: Replica) -> dict[str, Any]:
    return {
        "node": prim.node,
        "socket": f"{spec.host_path}/{world.namespace}/{world.name}/export.sock",
        "service": f"{world.name}.{world.namespace}.svc",
        "port": EXPORT_PORT,
        "exportName": "volume",
    }


def _steady(world: World, spec: VolumeSpec, st: VolumeStatus, actions: list[Action]) -> Plan:
    prim = st.primary
    assert prim is not None
    now = world.now
    manual = world.annotations.get(ANN_FAILOVER) == "now"
    phealth, pwhy = replica_health(world, prim, spec.grace_period_s, started=True)
    lease = world.lease
    lease_only = phealth == "ok" and primary_lost_lease(world)
    if lease_only:
        # e.g. its pod Running and ready but the agent cut off from the API server, or its
        # data path broken (the agent stops renewing and, once fenced, releases the Lease)
        phealth, pwhy = "dead", f"primary {prim.pod} lost its lease"
    pa = _agent(world, prim)
    if phealth == "ok" and pa is not None and pa.role != "primary":
        phealth, pwhy = "dead", f"agent of {prim.pod} is {pa.role}, not primary"
    idle = primary_not_serving(world) if phealth == "ok" else None
    if idle is not None:
        phealth, pwhy = "dead", idle

    # out-of-sync marks recorded by the primary in its Lease (durable, before any ack)
    sec = st.secondary
    floor = marks_floor(world)
    if (
        sec is not None
        and lease is not None
        and lease.out_of_sync_epoch is not None
        and (lease.out_of_sync_epoch >= floor)
        and not sec.out_of_sync
    ):
        sec = Replica(sec.node, sec.pod, sec.state, sec.address, True, synced=sec.synced)
        actions.append(
            Event(
                "Warning",
                "OutOfSync",
                f"primary dropped secondary {sec.pod} at epoch {lease.out_of_sync_epoch}; it needs a resync",
            )
        )
        st = st.with_(secondary=sec)
    # the primary rewrites it on its own (R5): a partial copy until it is in sync (H8),
    # recorded at once, so that no later rise of the epoch (a restart in place) hides it
    resyncing = lease is not None and lease.resync_epoch is not None and lease.resync_epoch >= floor
    if sec is not None and resyncing and (sec.synced or not sec.out_of_sync):
        sec = Replica(sec.node, sec.pod, sec.state, sec.address, True, synced=False)
        st = st.with_(secondary=sec)

    sec, st = _after_a_refused_restart(world, st, sec, pa, actions)

    refused = failover_blocker(replace(world, lease=None), spec, st, True) if manual and phealth == "ok" else None
    if refused is not None:
        # refused before the primary is stopped: stopping it could not promote anything
        actions.append(Event("Warning", "FailoverBlocked", f"manual failover refused: {refused}"))
        actions.append(ClearAnnotation(ANN_FAILOVER))
        manual = False
    if manual and phealth == "ok":
        # graceful manual failover: stop the primary first; it releases its lease on exit
        ppod = world.pods.get(prim.pod)
        if ppod is not None and not ppod.deleting:
            actions.append(DeletePod(prim.pod, "manual failover requested"))
            actions.append(Event("Normal", "ManualFailover", f"stopping primary {prim.pod}"))
        st = st.with_(message="manual failover: stopping the primary")
        return _finish(world, st, actions, False, failover_coming=True)

    if phealth != "ok":
        return _primary_down(world, spec, st, actions, phealth, pwhy, manual, lease_only or idle is not None)

    # primary is fine: its state, the endpoint, and the secondary
    st = st.with_(
        primary=Replica(prim.node, prim.pod, _state(world, prim), _pod_ip(world, prim)),
        endpoint=_endpoint(world, spec, prim),
    )
    assert pa is not None
    ppod = world.pods[prim.pod]
    if sec is None:
        return _place_secondary(world, spec, st, actions)
    # A secondary not (yet) in sync is still starting: its agent may report a role restored
    # from the node's disk, and the primary may still report the *previous* peer on the same
    # address as degraded. Only an in-sync secondary is judged by readiness and by the
    # primary's view of the link; a starting one only by its pod and node.
    sa0 = _agent(world, sec)
    started = sa0 is not None and sa0.role == "secondary" and not sec.out_of_sync
    shealth, swhy = replica_health(world, sec, spec.grace_period_s, started=started)
    if (
        shealth == "ok"
        and not sec.out_of_sync
        and pa.peer
        and pa.peer.startswith(f"{_pod_ip(world, sec)}:")
        and (pa.replication_state == "degraded")
        and not pa.reprotecting
    ):
        shealth, swhy = "dead", f"primary dropped secondary {sec.pod}: {pa.error or 'peer failed'}"
    if shealth == "dead":
        if sec.pod in world.pods and not world.pods[sec.pod].deleting:
            actions.append(DeletePod(sec.pod, swhy))
        actions.append(Event("Warning", "SecondaryLost", f"{swhy}; re-protecting"))
        st = st.with_(secondary=None, phase=Phase.DEGRADED, message=swhy, sync=None)
        return _finish(world, st, actions, False)

    spod = world.pods.get(sec.pod)
    if spod is None:
        if any(p.node == sec.node for p in world.pods.values() if p.name != prim.pod):
            msg = f"waiting for the old pod on {sec.node} to go away"
        else:
            actions.append(CreatePod(sec.pod, sec.node, "secondary"))
            msg = f"starting secondary {sec.pod} on {sec.node}"
        st = st.with_(phase=Phase.DEGRADED, message=msg)
        return _finish(world, st, actions, False)
    sa = _agent(world, sec)
    sec = Replica(sec.node, sec.pod, _state(world, sec), _pod_ip(world, sec), sec.out_of_sync, synced=sec.synced)
    st = st.with_(secondary=sec)
    if sa is None or not spod.ready:
        st = st.with_(phase=Phase.DEGRADED, message=f"waiting for secondary {sec.pod} to be ready")
        return _finish(world, st, actions, False)
    peer = f"{spod.ip}:{REPLICATION_PORT}"
    # the pair is linked only when the primary's link names this incarnation (H14)
    linked = pa.peer == peer and linked_to(pa, sa)
    needs_start = sa.role != "secondary" or not linked or pa.replication_state in ("none", "degraded")
    if needs_start and world.agent_call_in_flight:
        st = st.with_(phase=Phase.DEGRADED, message=f"re-protecting with {sec.pod}: waiting for an agent to answer")
        return _finish(world, st, actions, False)
    if sa.role != "secondary" and sec.out_of_sync and reprotect_hold(world):
        return _held(world, st, actions, f"starting secondary {sec.pod}")
    if sa.role != "secondary":
        epoch = st.epoch + 1
        actions.append(StartSecondary(sec.pod, spod.ip, epoch))
        # a new incarnation: no link goes to it yet, and a replica without the secondary
        # role on record may hold anything (a wiped data dir is blank); in sync only once paired
        sec = replace(sec, out_of_sync=True, synced=False)
        st = st.with_(epoch=epoch, secondary=sec, phase=Phase.DEGRADED, message=f"starting secondary {sec.pod}")
        return _finish(world, st, actions, False)
    if pa.size is not None and sa.size is not None and pa.size != sa.size:
        # a grow that stopped half-way (the secondary grew, the primary did not): replicas
        # of different sizes cannot pair, so the grow is finished first
        size = max(spec.size if spec.size <= MAX_SIZE else 0, pa.size, sa.size)  # never beyond what agents take
        actions.append(Grow(prim.pod, ppod.ip, pa.epoch, sec.pod, spod.ip, sa.epoch, size))
        st = st.with_(phase=Phase.DEGRADED, message=f"finishing the grow to {size} bytes")
        return _finish(world, st, actions, False)
    if pa.peer == peer and pa.replication_state == "degraded" and pa.reprotecting:
        # R5: the primary re-pairs with this peer on its own, bounded; a re-pair from here
        # would only interrupt it. Once it gives up, the operator re-pairs with a new epoch.
        st = st.with_(phase=Phase.DEGRADED, message=f"primary re-protecting {sec.pod} on its own")
        return _finish(world, st, actions, False)
    if not linked or pa.replication_state in ("none", "degraded"):
        if sec.out_of_sync and reprotect_hold(world):
            return _held(world, st, actions, f"the resync to {sec.pod}")
        epoch = st.epoch + 1
        request = resync_request(pa, sa)
        # the primary asks the peer's agent to end its older replication connections before
        # it links (docs/correctness.md R5), and for its checksums in a checksum resync (R4)
        peer_api = f"{spod.ip}:{API_PORT}"
        actions.append(StartPrimary(prim.pod, ppod.ip, epoch, peer, request, sa.epoch, sa.disk_id, peer_api))
        what = "resync (the primary copies what differs)" if request == "auto" else "full sync"
        actions.append(
            Event("Normal", "Resync", f"{what} {prim.pod} on {prim.node} -> {sec.pod} on {sec.node} (epoch {epoch})")
        )
        sec = Replica(sec.node, sec.pod, sec.state, sec.address, True, synced=False)
        st = st.with_(epoch=epoch, secondary=sec, phase=Phase.SYNCING, message=f"{what} {prim.node} -> {sec.node}")
        return _finish(world, st, actions, False)

    # replicating or syncing to the current incarnation of the secondary
    if pa.replication_state == "syncing":
        sync = sync_status(pa)
        cosmetic = True
        if sync is not None and (not st.sync or st.sync.get("kind") != sync["kind"]):
            actions.append(Event("Normal", "ResyncStarted", resync_started_message(pa, prim, sec)))
            cosmetic = False
        st = st.with_(
            phase=Phase.SYNCING,
            sync=sync or st.sync,
            message=f"{pa.sync_kind or 'full'} sync {prim.node} -> {sec.node}",
        )
        return _finish(world, st, actions, cosmetic)
    if pa.replication_state == "replicating":
        # a sync that ended in sync and is not in status yet: announced once, even one that
        # started and ended between two observations (its Event names kind, reason and bytes)
        ended = last_sync_status(pa.last_sync)
        if ended is not None and ended != st.last_sync:
            actions.append(Event("Normal", "ResyncCompleted", resync_completed_message(ended, prim, sec)))
            st = st.with_(last_sync=ended)
        st = st.with_(sync=None)
    if (
        sec.out_of_sync
        and pa.replication_state == "replicating"
        and not (lease is not None and lease.out_of_sync_epoch is not None and lease.out_of_sync_epoch >= floor)
    ):
        sec = Replica(sec.node, sec.pod, sec.state, sec.address, False, synced=True)
        actions.append(
            Event("Normal", "Replicating", f"{sec.pod} on {sec.node} is in sync with {prim.pod} on {prim.node}")
        )
        st = st.with_(secondary=sec)
    if sec.out_of_sync:
        st = st.with_(phase=Phase.DEGRADED, message=f"secondary {sec.pod} is OutOfSync")
        return _finish(world, st, actions, False)
    cosmetic = st.phase == Phase.REPLICATING
    st = st.with_(phase=Phase.REPLICATING, sync=None, message=f"{prim.node} -> {sec.node} in sync")

    # growing: only a pair in sync grows (both replicas report the same size)
    if pa.size is not None and pa.size == sa.size:
        if st.size != pa.size:
            st, cosmetic = st.with_(size=pa.size), False
        if spec.size > pa.size:
            if spec.size > MAX_SIZE:
                # the grow lets the secondary go (its first call) before the resize an agent
                # refuses: never begin a grow that cannot end; the pair stays in sync
                st = st.with_(
                    message=f"spec.size {spec.size} is more than 1Pi ({MAX_SIZE} bytes), the largest volume an "
                    "agent serves: not growing; set spec.size to at most 1Pi"
                )
            else:
                if not world.agent_call_in_flight:  # one grow at a time (each step is idempotent anyway)
                    actions.append(Grow(prim.pod, ppod.ip, pa.epoch, sec.pod, spod.ip, sa.epoch, spec.size))
                    actions.append(
                        Event("Normal", "Resizing", f"growing the volume from {pa.size} to {spec.size} bytes")
                    )
                st = st.with_(message=f"growing from {pa.size} to {spec.size} bytes")
                return _finish(world, st, actions, False)
        if spec.size < pa.size:
            st = st.with_(
                message=f"spec.size {spec.size} is smaller than the volume's {pa.size} bytes: a volume never "
                f"shrinks; set spec.size to at least {pa.size}"
            )

    # checkpoints: on schedule and on request
    cp = _checkpoint_status(sa.checkpoint) or (dict(st.checkpoint) if st.checkpoint else None)
    if cp is not None and cp.get("id"):
        st = st.with_(checkpoint=cp)
    requested = world.annotations.get(ANN_CHECKPOINT) == "now"
    last = parse_time(cp.get("time")) if cp else None
    # checkpoint 0 is the secondary's disk from before the full sync, and a secondary that
    # restarted after an unclean stop has none either (restorePoint false): cut one as soon
    # as the pair is in sync
    agent_cp = sa.checkpoint or {}
    no_restore_point = not agent_cp.get("id") or agent_cp.get("restorePoint") is False
    due = spec.checkpoint_interval_s > 0 and (
        no_restore_point or last is None or now - last >= spec.checkpoint_interval_s
    )
    if requested or due:
        actions.append(Checkpoint(sec.pod, spod.ip, pa.link_serial))
        if requested:
            actions.append(ClearAnnotation(ANN_CHECKPOINT))
    return _finish(world, st, actions, cosmetic)


MiB = 1 << 20


def sync_status(pa: AgentView) -> dict[str, Any] | None:
    """``status.sync`` while the primary copies to its peer: the kind it chose and why, the
    bytes this resync copies (not the volume's size) and how far it is, and ``summary`` for
    ``kubectl get`` (the SYNC column). Any kind string the agent reports is shown as is."""
    if pa.sync_kind is None and not pa.sync_total:
        return None
    kind = pa.sync_kind or "full"  # an agent that did not say
    total = pa.sync_total or 0
    done = min(pa.sync_done or 0, total) if total else 0
    ratio = done / total if total else 0.0
    out: dict[str, Any] = {
        "kind": kind,
        "reason": pa.sync_reason or "",
        "progress": round(ratio, 4),
        "doneBytes": done,
        "totalBytes": total,
        "summary": f"{kind} {ratio * 100:.0f}% ({_mib(total - done)} to go)",
    }
    if pa.sync_compared is not None:
        out["comparedBytes"] = pa.sync_compared
        if not total and pa.size:  # still comparing: what it copies is not known yet
            compared = min(pa.sync_compared, pa.size) / pa.size
            out["summary"] = f"{kind} comparing {compared * 100:.0f}% of {_mib(pa.size)}"
    return out


def _mib(n: int) -> str:
    return f"{n / MiB:.1f} MiB" if n < 10 * MiB else f"{n // MiB} MiB"


def resync_started_message(pa: AgentView, prim: Replica, sec: Replica) -> str:
    if pa.sync_compared is not None and not pa.sync_total and pa.size:
        what = f"compares {_mib(pa.size)}, then copies what differs"
    else:
        what = f"{_mib(pa.sync_total or 0)} to copy"
    return (
        f"{pa.sync_kind} resync {prim.pod} on {prim.node} -> {sec.pod} on {sec.node}: "
        f"{what} ({pa.sync_reason or 'no reason given'})"
    )


def last_sync_status(last: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """``status.lastSync`` from the primary's ``replication.lastSync`` (``endedAt``: its
    Unix time, shown as ``time``)."""
    if not last or not last.get("kind"):
        return None
    out: dict[str, Any] = {
        "kind": str(last["kind"]),
        "reason": str(last.get("reason") or ""),
        "copiedBytes": int(last.get("copiedBytes") or 0),
        "seconds": float(last.get("seconds") or 0.0),
    }
    ended = last.get("endedAt")
    if isinstance(ended, int | float):
        out["time"] = rfc3339(float(ended))
    return out


def resync_completed_message(last: Mapping[str, Any], prim: Replica, sec: Replica) -> str:
    return (
        f"{last['kind']} resync {prim.pod} -> {sec.pod} done: {_mib(last['copiedBytes'])} "
        f"copied in {last['seconds']:.1f} s ({last['reason'] or 'no reason given'})"
    )


def resync_request(primary: AgentView, secondary: AgentView) -> str:
    """``auto`` whenever the secondary names its disk: the primary's agent then chooses
    (docs/correctness.md, R1 to R4, R6): a bitmap resync when it has a record of that very
    disk (the same node and data dir, restarted or reconnected) or when the secondary is the
    old primary that stopped cleanly in sync with the disk this primary was promoted from
    (only what this primary wrote since is copied), a checksum resync when it has none but
    the disk holds the volume's size of data (the old primary rejoining after an unplanned
    failover), else a full copy with the reason. Without a disk identity, ``full``. The
    secondary checks the identity itself (it answers only to the export name that carries
    it), so a stale view here costs a full copy, nothing else."""
    del primary
    return "auto" if secondary.disk_id is not None else "full"


def reprotect_hold(world: World) -> bool:
    """Whether this volume's next step of re-protection waits for the failovers of other
    volumes (docs/correctness.md H20).

    A node that dies holding many primaries has them all failed over at once, and the
    volumes whose secondary it held lose it at the same moment. Each of those, and each
    volume as soon as it has failed over, places a new secondary: a pod start (an agent, a
    qemu-storage-daemon) and a full or bitmap sync, on the same nodes and under the same
    operator as the failovers that are still running, which it slows. So while other volumes
    of this operator are failing over or about to (``World.failovers_elsewhere``), the steps
    that start re-protection wait: placing a new secondary (its pod is created by the same
    plan), giving it the secondary role, and the primary's start that syncs to it. The last
    two wait only for a secondary the status already holds OutOfSync: the step would mark
    an in-sync one OutOfSync before its call, and a held step must not leave it recorded as
    promotable. Nothing else waits: not this volume's own failover, not a restart in place,
    not the drop of a dead secondary, the marks, the labels, checkpoints or a grow.

    At most ``Settings.reprotect_hold_max_s`` from ``World.reprotect_held_since``: a failover
    elsewhere that does not end keeps no volume unprotected for longer than that."""
    cap = world.settings.reprotect_hold_max_s
    if world.failovers_elsewhere <= 0 or cap <= 0:
        return False
    since = world.reprotect_held_since
    return since is None or world.now - since < cap


def _held(world: World, st: VolumeStatus, actions: list[Action], step: str) -> Plan:
    """The plan of a volume whose re-protection waits (:func:`reprotect_hold`): the status
    as it is, Degraded, saying what waits; no step of re-protection."""
    cap = world.settings.reprotect_hold_max_s
    msg = f"re-protection waits while other volumes fail over (at most {cap:g} s); next: {step}"
    return _finish(world, st.with_(phase=Phase.DEGRADED, message=msg), actions, False, reprotect_held=True)


def next_reprotect_held_since(world: World, p: Plan) -> float | None:
    """Since when the volume's re-protection has waited, after plan ``p`` (the loop keeps it
    for its next ``World.reprotect_held_since``): set by the first plan that holds, kept while
    failovers elsewhere go on — so the cap, once reached, lets every later step through —
    and forgotten once none does or the volume is in sync again."""
    if p.reprotect_held:
        return world.now if world.reprotect_held_since is None else world.reprotect_held_since
    if world.failovers_elsewhere <= 0 or p.status.phase == Phase.REPLICATING:
        return None
    return world.reprotect_held_since


def _place_secondary(world: World, spec: VolumeSpec, st: VolumeStatus, actions: list[Action]) -> Plan:
    prim = st.primary
    assert prim is not None
    busy = {p.node for p in world.pods.values() if p.name != prim.pod}
    candidates = [n for n in eligible_nodes(spec, world.nodes) if n.name != prim.node and n.name not in busy]
    prefer = [st.last_failover.from_node] if st.last_failover else []
    ranked = rank_nodes(candidates, world.placement, prefer)
    if not ranked:
        waiting = sorted(busy - {prim.node})
        msg = "no eligible node for a new secondary" + (
            f" (waiting for old pods on {', '.join(waiting)} to go away)"
            if waiting
            else "; add a ready node matching spec.nodes/nodeSelector"
        )
        st = st.with_(phase=Phase.DEGRADED, message=msg)
        return _finish(world, st, actions, False)
    if reprotect_hold(world):
        return _held(world, st, actions, "a new secondary")
    epoch = st.epoch + 1
    sec = Replica(node=ranked[0], pod=pod_name(world.name, epoch), state="Placed", out_of_sync=True)
    actions.append(CreatePod(sec.pod, sec.node, "secondary"))
    actions.append(Event("Normal", "Reprotecting", f"new secondary {sec.pod} on {sec.node}"))
    st = st.with_(
        epoch=epoch, secondary=sec, phase=Phase.DEGRADED, message=f"re-protecting: new secondary on {sec.node}"
    )
    return _finish(world, st, actions, False)


def _primary_down(
    world: World,
    spec: VolumeSpec,
    st: VolumeStatus,
    actions: list[Action],
    health: str,
    why: str,
    manual: bool,
    only_its_lease: bool = False,
) -> Plan:
    """``only_its_lease``: the primary's pod, node and agent are fine; it lost its Lease, or
    does not serve, and may be fit to serve again in place (H10)."""
    prim, sec = st.primary, st.secondary
    assert prim is not None
    if health == "suspect":
        st = st.with_(
            phase=Phase.DEGRADED if st.phase != Phase.REPLICATING else st.phase, message=f"primary suspect: {why}"
        )
        coming = failover_coming(world, spec, st, manual, only_its_lease)
        return _finish(world, st, actions, False, failover_coming=coming)
    if not manual:
        since = world.suspect_since.get(prim.pod, world.now)
        if world.now - since < spec.grace_period_s:
            st = st.with_(message=f"primary down ({why}); grace period running")
            coming = failover_coming(world, spec, st, manual, only_its_lease)
            return _finish(world, st, actions, False, failover_coming=coming)
    last = st.last_restart
    if last is not None and last.pod == prim.pod and last.epoch == st.epoch and world.agent_call_in_flight:
        # the restart in place is being carried out (taking the Lease may take a duration)
        msg = f"restarting primary {prim.pod} in place at epoch {st.epoch}: waiting for its agent"
        return _finish(world, st.with_(phase=Phase.DEGRADED, message=msg), actions, False)
    if only_its_lease and not manual:
        fit = fit_to_restart_in_place(world, st)
        if fit is None:
            msg = f"{why}; nothing else is wrong with it: it serves again on {prim.node}, no failover"
            return _restart_primary_in_place(
                world, st.with_(phase=Phase.DEGRADED, message=msg), actions, why, "lease-lost"
            )
    blocker = failover_blocker(world, spec, st, manual)
    if blocker is not None:
        msg = f"primary down ({why}); {blocker}"
        if blocker.startswith("waiting for lease"):
            return _finish(world, st.with_(phase=Phase.DEGRADED, message=msg), actions, False, failover_coming=True)
        if manual:
            # the automatic path may have said the blocker already: the request is new news
            msg += f"; the manual failover ({ANN_FAILOVER}=now) waits"
        if (blocker if not manual else msg) not in st.message:
            actions.append(Event("Warning", "FailoverBlocked", msg))
        return _restart_primary_in_place(world, st.with_(phase=Phase.FAILED, message=msg), actions)
    assert sec is not None
    epoch = st.epoch + 1
    reason = "manual" if manual else why
    spod = world.pods[sec.pod]
    fo = Failover(
        time=rfc3339(world.now), from_node=prim.node, to_node=sec.node, mode=spec.failover_mode, reason=reason
    )
    trigger = failover_trigger(reason) if _takes_trigger(world, sec.pod) else None
    actions.append(DoFailover(sec.pod, spod.ip, epoch, spec.agent_failover_mode, trigger))
    actions.append(
        Event(
            "Warning" if not manual else "Normal",
            "FailingOver",
            f"promoting {sec.pod} on {sec.node} (epoch {epoch}, mode {spec.failover_mode}): {reason}",
        )
    )
    st = st.with_(
        phase=Phase.FAILING_OVER, epoch=epoch, last_failover=fo, message=f"failing over to {sec.node}: {reason}"
    )
    return _finish(world, st, actions, False)


def failover_coming(
    world: World, spec: VolumeSpec, st: VolumeStatus, manual: bool, only_its_lease: bool
) -> bool:
    """Whether a primary judged suspect or down, whose grace period or Lease is still
    running, will be failed over once they have run out (``Plan.failing_over``): the
    secondary may be promoted but for the Lease, and the primary is not one that lost only
    its Lease and is fit to serve again in place (H10). Judged on this tick's view; it
    decides nothing about this volume, only how long other volumes' re-protection waits."""
    if failover_blocker(replace(world, lease=None), spec, st, manual) is not None:
        return False
    return manual or not only_its_lease or fit_to_restart_in_place(world, st) is not None


def _after_a_refused_restart(
    world: World, st: VolumeStatus, sec: Replica | None, pa: AgentView | None, actions: list[Action]
) -> tuple[Replica | None, VolumeStatus]:
    """A restart in place marks the secondary OutOfSync before the call, since the primary
    may then acknowledge writes alone. If the primary says that the start at the volume's
    epoch refused to serve (it could not take its Lease), it served nothing at that epoch
    and never will (serving again takes a newer epoch): the secondary missed nothing since
    the restart, and if it was in sync before it, it is promotable again — so a primary that
    cannot take its Lease back is failed over instead of being restarted in place for ever."""
    last, lease = st.last_restart, world.lease
    if (
        sec is None
        or last is None
        or pa is None
        or not sec.out_of_sync
        or not last.secondary_in_sync
        or last.secondary != sec.pod
        or last.epoch != st.epoch
        or pa.epoch != st.epoch
        or pa.refused_epoch != st.epoch
        or pa.serving
        # the primary's own record (durable before it acknowledges a write alone) and its
        # Lease marks: the status may not have caught up with either before the restart
        or pa.peer_out_of_sync
        or lease is None
        or lease.out_of_sync_epoch is not None
        or lease.resync_epoch is not None
    ):
        return sec, st
    sec = replace(sec, out_of_sync=False, synced=True)
    actions.append(
        Event(
            "Warning",
            "RestartRefused",
            f"{last.pod} could not take its lease at epoch {st.epoch} and served nothing: {sec.pod} is in sync "
            "as before the restart and may be promoted",
        )
    )
    return sec, st.with_(secondary=sec)


def fit_to_restart_in_place(world: World, st: VolumeStatus) -> str | None:
    """Why a primary that lost its Lease must be failed over rather than asked to serve
    again in place (None: it may serve again; docs/correctness.md, H10).

    A Lease is lost by a primary that could not renew it in time: a dead or partitioned
    node, a dead agent, a broken data path — or an API server that answered too slowly, the
    node and the primary being fine. In that last case a failover gains nothing and costs a
    lot: it replaces the old primary's pod, makes it resync from the new primary, rolls a
    Checkpoint-mode volume back to its last cut, and, when a control plane is slow for many
    volumes at once, does so for every one of them and loads the API server further (a
    failover storm). So a primary whose own agent says that its Lease, and nothing else,
    stopped it is asked to serve again in place, once: if it loses its Lease again within
    ``restart_in_place_window_s`` of that, it is failed over.

    Safe for the same reason as every restart in place: the epoch is handed out only once
    the Lease expired or was released, the disk is the primary's own (the latest data: it
    took every acknowledged write), and no other replica serves.
    """
    prim = st.primary
    assert prim is not None
    if world.settings.restart_in_place_window_s <= 0:
        return "restarts in place are turned off (PAIRVOL_RESTART_IN_PLACE_WINDOW=0)"
    node = world.node(prim.node)
    if node is None or not node.ready:
        return f"node {prim.node} is not Ready"
    pod = world.pods.get(prim.pod)
    if pod is None or pod.deleting or pod.phase != "Running" or not pod.ready:
        return f"pod {prim.pod} is not running and ready"
    pa = _agent(world, prim)
    if pa is None:
        return f"the agent of {prim.pod} does not answer"
    if pa.role != "primary" or pa.epoch != st.epoch:
        return f"the agent of {prim.pod} is {pa.role} at epoch {pa.epoch}, not the primary of epoch {st.epoch}"
    if pa.serving:
        return f"the agent of {prim.pod} still says it serves"
    refused = pa.refused_epoch == st.epoch  # it could not take its Lease: it never served at this epoch
    if pa.fenced_by not in ("lease", None) or (pa.fenced_by is None and not refused):
        return f"its workload export was stopped by {pa.fenced_by or 'something other than its Lease'}"
    if pa.local_failure:
        return f"its local disk failed a request ({pa.local_failure})"
    if not pa.daemon_alive:
        return "its qemu-storage-daemon is not running"
    last = st.last_restart
    if last is not None and last.pod == prim.pod:
        t = parse_time(last.time)
        window = world.settings.restart_in_place_window_s
        if t is not None and world.now - t < window:
            ago = world.now - t
            return f"it was restarted in place {ago:.0f}s ago (less than {window:.0f}s) and lost its lease again"
    return None


def _restart_primary_in_place(
    world: World,
    st: VolumeStatus,
    actions: list[Action],
    why: str = "no replica may be promoted",
    trigger: str = "no-failover",
) -> Plan:
    """No replica may be promoted, or the primary lost nothing but its Lease
    (:func:`fit_to_restart_in_place`): the primary serves again, on its own node and disk,
    its role confirmed with a new epoch. ``why`` goes to the Event and ``status.lastRestart``.

    Without this a primary pod that ended (a failed liveness probe ends it: restartPolicy
    Never), or a primary that fenced itself when it lost its Lease, left the volume down for
    good while its node was Ready. It is safe by construction: the failover is blocked, so no
    other replica serves; the pod keeps its name and node, and so its data dir; its agent
    restores the primary role from disk and serves nothing until this new epoch (restored
    primaries wait, docs/correctness.md I2); and the epoch is handed out only once the Lease
    has expired or been released, so the previous process cannot still be acknowledging
    writes. A replica without the primary role on record (a wiped data dir) is never asked to
    serve: its disk is not the volume's. It serves alone, so the secondary is marked OutOfSync
    first (persisted with this plan, before the call): the writes it now acknowledges are not
    on the secondary, which must not be promoted automatically until a resync.
    """
    prim = st.primary
    assert prim is not None
    base = st.message

    def wait(why: str) -> Plan:
        return _finish(world, st.with_(message=f"{base}; {why}"), actions, False)

    node = world.node(prim.node)
    if node is None or not node.ready:
        return wait(f"restarting primary {prim.pod} once node {prim.node} is Ready")
    pod = world.pods.get(prim.pod)
    if pod is None:
        if any(p.node == prim.node for p in world.pods.values()):
            return wait(f"waiting for the old pod on {prim.node} to go away before restarting the primary there")
        actions.append(CreatePod(prim.pod, prim.node, "primary"))
        restart = f"no failover possible: restarting {prim.pod} on {prim.node}"
        actions.append(Event("Normal", "RestartingPrimary", restart))
        return wait(f"restarting primary {prim.pod} on {prim.node}")
    if pod.deleting:
        return wait(f"waiting for pod {prim.pod} to go away before restarting it on {prim.node}")
    if pod.phase in ("Failed", "Succeeded"):
        what = "failed" if pod.phase == "Failed" else "ended"
        actions.append(
            DeletePod(prim.pod, f"primary {what} while no failover is possible; restarting it on {prim.node}")
        )
        return wait(f"primary pod {prim.pod} {what}; replacing it on {prim.node}")
    pa = _agent(world, prim)
    if pa is None or not pod.ready or not pod.ip:
        return wait(f"waiting for primary {prim.pod} on {prim.node} to be ready")
    if pa.role != "primary":
        return wait(
            f"agent of {prim.pod} has no primary role on record ({pa.role}): its data dir is not the "
            "volume's; restore it, or accept a failover by hand"
        )
    if pa.local_failure is not None:
        # H13: its disk lacks a write only the secondary took; serving it would lose that write
        return wait(
            f"primary {prim.pod} is not restarted: its local disk failed a request that only the secondary served "
            f"({pa.local_failure}); the volume waits for the secondary to be promotable"
        )
    if pa.serving:
        return wait(f"primary {prim.pod} serves but does not hold its lease")
    lease = world.lease
    lease_over = lease is None or lease.expired(world.settings.lease_margin_s)
    if lease is not None and not lease_over:  # (it reached this far only on a view that judged it dead)
        return wait(f"waiting for the lease held by {lease.holder} to expire before {prim.pod} serves again")
    if world.agent_call_in_flight:
        return wait("waiting for an agent to answer")
    epoch = st.epoch + 1
    sec = st.secondary
    if sec is not None and not sec.out_of_sync:
        sec = replace(sec, out_of_sync=True)
    if world.annotations.get(ANN_FAILOVER) == "now":
        # a manual failover that could not be carried out is consumed here, before the call
        # (an action that fails stops those after it): once the primary serves again alone,
        # a request left standing would promote a secondary that lacks its writes (H16)
        actions.append(ClearAnnotation(ANN_FAILOVER))
        actions.append(
            Event(
                "Warning",
                "ManualFailoverNotDone",
                f"the manual failover ({ANN_FAILOVER}=now) was not carried out: {base}; {prim.pod} on "
                f"{prim.node} serves again instead (epoch {epoch}) and the secondary is resynced; annotate "
                "again to fail over once the volume is Replicating",
            )
        )
    actions.append(StartPrimary(prim.pod, pod.ip, epoch, None, "none"))
    actions.append(
        Event("Warning", "PrimaryRestarted", f"{prim.pod} on {prim.node} serves again alone (epoch {epoch}): {why}")
    )
    actions.append(RestartedInPlace(trigger))
    st = st.with_(
        epoch=epoch,
        secondary=sec,
        last_restart=Restart(
            time=rfc3339(world.now),
            pod=prim.pod,
            node=prim.node,
            epoch=epoch,
            reason=why,
            secondary=None if st.secondary is None else st.secondary.pod,
            secondary_in_sync=(
                st.secondary is not None
                and st.secondary.synced
                and not st.secondary.out_of_sync
                and not pa.peer_out_of_sync
            ),
        ),
        phase=Phase.DEGRADED,
        message=f"primary {prim.pod} serves again on {prim.node} (epoch {epoch}); re-protecting",
    )
    return _finish(world, st, actions, False)


def _resume_failover(world: World, spec: VolumeSpec, st: VolumeStatus, actions: list[Action]) -> Plan:
    """Phase FailingOver: finish the bookkeeping once the target serves, or retry, or give up."""
    fo, prim, sec = st.last_failover, st.primary, st.secondary
    assert fo is not None and prim is not None
    if sec is None:
        msg = "failover target vanished from status; manual repair needed"
        return _finish(world, st.with_(phase=Phase.FAILED, message=msg), actions, False)
    sa = _agent(world, sec)
    spod = world.pods.get(sec.pod)
    if sa is not None and sa.role == "primary" and not (sa.serving and sa.epoch >= st.epoch):
        return _serve_after_failover(world, st, actions, sec, sa)
    if sa is not None and sa.role == "primary" and sa.epoch >= st.epoch:
        started = parse_time(fo.time) or world.now
        dur = max(0.0, world.now - started)
        fo = Failover(fo.time, fo.from_node, fo.to_node, fo.mode, fo.reason, round(dur * 1000, 1))
        new_primary = Replica(sec.node, sec.pod, _state(world, sec), _pod_ip(world, sec))
        # what only this tick does first: an action that fails stops those after it, and
        # the label and the old pod are planned again by every later tick (role_labels, garbage)
        if world.annotations.get(ANN_FAILOVER):
            actions.append(ClearAnnotation(ANN_FAILOVER))
        actions.append(
            Event(
                "Normal",
                "FailedOver",
                f"{sec.pod} on {sec.node} is primary (epoch {st.epoch}, "
                f"{fo.mode}, {dur * 1000:.0f} ms); was {prim.pod} on {prim.node}",
            )
        )
        actions.append(FailoverDone(dur, fo.mode, fo.reason))
        actions.append(SetRole(sec.pod, "primary"))
        if prim.pod in world.pods and not world.pods[prim.pod].deleting:
            actions.append(DeletePod(prim.pod, "demoted by failover"))
        st = st.with_(
            phase=Phase.DEGRADED,
            primary=new_primary,
            secondary=None,
            last_failover=fo,
            endpoint=_endpoint(world, spec, new_primary),
            sync=None,
            message=f"failed over to {sec.node}; re-protecting",
        )
        return _finish(world, st, actions, False)
    if sa is not None and sa.stage == "failover_failed":
        msg = f"failover of {sec.pod} failed: {sa.error or 'see agent log'}"
        if st.message != msg:
            actions.append(Event("Warning", "FailoverFailed", msg))
        return _finish(world, st.with_(phase=Phase.FAILED, message=msg), actions, False)
    if spod is None or spod.deleting or spod.phase in ("Failed", "Succeeded"):
        return _target_lost(world, spec, st.with_(phase=Phase.FAILED), actions)
    if sa is not None and sa.role == "secondary" and sa.stage == "running" and spod.ip:
        # the call never reached it (or the operator restarted before making it): retry
        reason = st.last_failover.reason if st.last_failover else ""
        trigger = failover_trigger(reason) if sa.takes_trigger else None
        actions.append(DoFailover(sec.pod, spod.ip, st.epoch, spec.agent_failover_mode, trigger))
    return _finish(world, st.with_(message=f"failing over to {sec.node}"), actions, False)


def failover_trigger(reason: str) -> str:
    """The failover's trigger as the agent counts it, from the reason its status records."""
    return "manual" if reason == "manual" else "automatic"


def _takes_trigger(world: World, pod: str) -> bool:
    view = world.agents.get(pod)
    return view is not None and view.takes_trigger


def failover_unresolved(st: VolumeStatus) -> bool:
    """A failover ended without being recorded as done (its target was lost, or said that
    it failed) while the status still names the old primary and, as secondary, the target:
    whether the target may have served decides what happens next (H15)."""
    fo, prim, sec = st.last_failover, st.primary, st.secondary
    return (
        st.phase == Phase.FAILED
        and fo is not None
        and fo.duration_ms is None
        and prim is not None
        and prim.node == fo.from_node
        and sec is not None
        and sec.node == fo.to_node
    )


def _target_gone(world: World, rep: Replica) -> bool:
    pod = world.pods.get(rep.pod)
    return pod is None or pod.deleting or pod.phase in ("Failed", "Succeeded")


def target_never_served(world: World) -> bool:
    """Whether the operator knows that the target of an unfinished failover never served
    (False: it may have). A target serves only as primary, after it holds the Lease (H1); so
    its own agent saying it has no primary role is proof, and so is a Lease (read from the
    API server, ``lease_needs_fresh_read``) still held by the old primary once the target's
    pod has ended or is gone (a pod still being deleted may still run its agent)."""
    st = world.status
    prim, sec = st.primary, st.secondary
    assert prim is not None and sec is not None
    sa = _agent(world, sec)
    if sa is not None and sa.role == "secondary":
        return True  # it never took the primary role
    pod = world.pods.get(sec.pod)
    lease = world.lease
    ended = pod is None or (not pod.deleting and pod.phase in ("Failed", "Succeeded"))
    # it never took the Lease, and no process of its pod can any more
    return sa is None and ended and lease is not None and lease.holder == prim.pod


def _target_lost(world: World, spec: VolumeSpec, st: VolumeStatus, actions: list[Action]) -> Plan:
    """The failover's target died, or the failover ended unfinished (docs/correctness.md
    H15). A target that may have served holds writes the old primary lacks: the old primary
    is then never made to serve, restarted, or used as the source of a resync again; the
    volume stays Failed until the target answers again (its pod is created again on its node
    once that node is Ready: its agent restores its role from its disk). Only proof that it
    never served (``target_never_served``) gives the volume back to the old primary."""
    prim, sec, fo = st.primary, st.secondary, st.last_failover
    assert prim is not None and sec is not None and fo is not None
    sa = _agent(world, sec)
    if sa is not None and sa.role == "primary":
        # it is back, with the role it took: the failover goes on (it serves, or is asked to)
        return _resume_failover(world, spec, st.with_(phase=Phase.FAILING_OVER), actions)
    if target_never_served(world):
        failed = sa is not None and sa.stage == "failover_failed"
        if _target_gone(world, sec):
            msg = f"failover target {sec.pod} died during failover; no replica left to promote"
        elif failed:
            assert sa is not None
            msg = f"failover of {sec.pod} failed: {sa.error or 'see agent log'}"
        else:
            msg = f"failover to {sec.pod} did not finish; no replica left to promote"
        if st.message != msg:
            actions.append(Event("Warning", "FailoverFailed", msg))
        # settled: the target is no replica any more, the failover record goes with it
        st = st.with_(phase=Phase.FAILED, message=msg, secondary=None, last_failover=None)
        return _finish(world, st, actions, False)
    msg = (
        f"failover to {sec.pod} on {sec.node} did not finish and {sec.pod} may have served writes that "
        f"{prim.pod} on {prim.node} lacks; {prim.pod} is not made to serve again. Bring node {sec.node} back: "
        f"{sec.pod} then answers and the failover finishes. If that node's disk is lost for good, so are the "
        f"writes {sec.pod} acknowledged, and serving {prim.pod}'s older data is a repair by hand"
    )
    if st.message != msg:
        actions.append(Event("Warning", "FailoverTargetLost", msg))
    pod, node = world.pods.get(sec.pod), world.node(sec.node)
    if node is not None and node.ready:
        # its data dir is on its node: a pod of the same name there brings its agent back
        if pod is None and not any(p.node == sec.node for p in world.pods.values()):
            actions.append(CreatePod(sec.pod, sec.node, "secondary"))
        elif pod is not None and not pod.deleting and pod.phase in ("Failed", "Succeeded"):
            actions.append(DeletePod(sec.pod, f"failover target ended; creating it again on {sec.node}"))
    return _finish(world, st.with_(phase=Phase.FAILED, message=msg), actions, False)


def _serve_after_failover(
    world: World, st: VolumeStatus, actions: list[Action], sec: Replica, sa: AgentView
) -> Plan:
    """The target took the primary role but does not serve (its Lease could not be taken,
    the export could not be added): the failover is not done. Ask it to serve again with
    a new epoch and no peer — an agent in primary/done accepts that — until it serves;
    one call at a time, each with its own epoch (persisted before the call)."""
    spod = world.pods.get(sec.pod)
    waiting = f"failing over to {sec.node}: {sec.pod} is primary but not serving"
    if sa.error:
        waiting += f" ({sa.error})"
    if spod is None or spod.deleting or not spod.ip or spod.phase != "Running":
        return _finish(world, st.with_(message=waiting), actions, False)
    if world.agent_call_in_flight:
        return _finish(world, st.with_(message=f"{waiting}; waiting for the agent to answer"), actions, False)
    epoch = st.epoch + 1
    actions.append(StartPrimary(sec.pod, spod.ip, epoch, None, "none"))
    if not st.message.startswith(waiting):
        actions.append(Event("Warning", "NotServing", f"{waiting}; asking it to serve again"))
    st = st.with_(epoch=epoch, message=f"{waiting}; asking it to serve (epoch {epoch})")
    return _finish(world, st, actions, False)


def unhealthy_pods(world: World) -> set[str]:
    """Replica pods that look unwell right now; the caller remembers since when (grace)."""
    out: set[str] = set()
    st = world.status
    for rep in (st.primary, st.secondary):
        if rep is None:
            continue
        pod = world.pods.get(rep.pod)
        node = world.node(rep.node)
        if (
            pod is None
            or pod.deleting
            or not pod.ready
            or world.agents.get(rep.pod) is None
            or node is None
            or not node.ready
        ):
            out.add(rep.pod)
    if primary_lost_lease(world) or primary_not_serving(world) is not None:
        assert st.primary is not None
        out.add(st.primary.pod)
    return out


def next_suspect_since(previous: Mapping[str, float], world: World) -> dict[str, float]:
    """Since when each replica pod has looked unwell: the grace period's clock (wall time),
    kept from the previous tick while the pod still looks unwell, else started now. What the
    loop remembers from tick to tick; :func:`grace_started` adds what the Lease says."""
    return {pod: previous.get(pod, world.now) for pod in unhealthy_pods(world)}


def grace_started(suspects: Mapping[str, float], world: World) -> dict[str, float]:
    """``suspects`` as the plan uses them: a primary whose Lease has expired in this
    operator's view has not been able to serve since its validity ended, which was at the
    latest one Lease duration after this operator first saw the record (for a released
    Lease: before it first saw the release); its grace period runs from there if that is
    earlier. It matters when this loop began looking after the primary died — a standby
    replica that has just taken over, which has watched the Lease all along (H5). Never
    remembered from tick to tick (a renewed Lease takes it back at once), and never lets a
    failover come before the Lease has expired: that is a rule of its own.
    """
    out = dict(suspects)
    prim, lease = world.status.primary, world.lease
    if prim is not None and prim.pod in out and lease is not None and primary_lost_lease(world):
        held_for = lease.duration_s if lease.holder and lease.duration_s is not None else 0.0
        at = world.now if lease.observed_at is None else lease.observed_at
        out[prim.pod] = min(out[prim.pod], at - max(0.0, lease.observed_age_s - held_for))
    return out


def primary_not_serving(world: World) -> str | None:
    """Why the primary, by its own agent's word, does not serve the workload export at the
    volume's epoch while nothing is being done about it (None: it serves, or a role call is
    on its way — this operator's, or any command its agent says it is carrying out — or its
    agent has not reached this epoch yet).

    A primary stops serving when it fences itself (its Lease lost, its data path failed); its
    Lease then runs out and the planner sees that. But a start that refused to serve because
    it could not take its Lease (a slow API server) may leave no Lease at all, and an absent
    Lease is no sign of anything: without this the volume stayed "Replicating" with nobody
    serving it (seen at 40 volumes on one machine). Judged down, it goes the way of any
    primary that is down: restarted in place (H10) or failed over once its Lease, if any,
    has expired.
    """
    st = world.status
    prim = st.primary
    if prim is None or not st.activated or st.failing_over or world.agent_call_in_flight:
        return None
    pa = _agent(world, prim)
    if pa is None or pa.role != "primary" or pa.epoch != st.epoch or pa.serving:
        return None
    if pa.busy:
        # a command is under way: a start (perhaps sent by an operator process that has
        # since died) may still take the Lease and serve at this epoch; once it has ended,
        # nothing serves at this epoch any more (serving again takes a newer one)
        return None
    if pa.refused_epoch == st.epoch:
        return f"primary {prim.pod} does not serve: its start at epoch {st.epoch} could not take the lease"
    return f"primary {prim.pod} does not serve at epoch {st.epoch} ({pa.error or pa.fenced_by or 'no reason given'})"


def primary_lost_lease(world: World) -> bool:
    """The serving primary's Lease has expired, or was released, in this operator's view.

    A Lease with no holder counts: an agent releases it only once it no longer serves
    (demotion, shutdown, a failed data path). A Lease held by another pod does not: after
    a failover it is the old primary's until the new one takes it over.
    """
    prim, lease = world.status.primary, world.lease
    if prim is None or lease is None or lease.holder not in (prim.pod, None):
        return False
    return lease.expired(world.settings.lease_margin_s)


# ------------------------------------------------------------ cached observations
#
# The operator reads nodes, pods, Leases and the volume from watch caches (informer.py),
# which lag the API server by the time an event takes to arrive. A lagging cache may only
# delay a decision, never cause a wrong one; these rules say when the loop reads the API
# server instead, and handlers.py applies them before it builds the World.


def lease_needs_fresh_read(world: World) -> bool:
    """Whether this tick's Lease, taken from the cache, must be read from the API server.

    The Lease counts once a primary serves (the volume is activated, not failing over):
    from then on the planner fails over when it is absent, released or expired, and marks
    the secondary out of sync from it. A cached Lease is trusted to say that the primary
    still holds it (which at worst delays a failover). One that could let a failover go
    ahead — absent, released, or unchanged for longer than its duration — is read again,
    and with it the out-of-sync mark the primary writes before it acknowledges a write its
    secondary missed; so a failover is never decided on a Lease record older than the API
    server's. Not while something else blocks the failover whatever the Lease says (no
    secondary, one that never finished its full sync, automatic failover off, an
    unhealthy secondary): a volume stuck there does not poll the API server every tick.

    After a failover whose target's pod ended or is gone, a cached Lease still held by the
    old primary is read again too: it is what gives the volume back to the old primary
    (H15), and the target may have taken the Lease since.
    """
    st = world.status
    if (st.failing_over or failover_unresolved(st)) and st.secondary is not None and _target_gone(world, st.secondary):
        # H15: a Lease still held by the old primary is what gives the volume back to it
        return st.primary is not None and world.lease is not None and world.lease.holder == st.primary.pod
    if st.primary is None or not st.activated or st.failing_over or isinstance(world.spec, SpecError):
        return False
    if world.lease is not None and not world.lease.expired(world.settings.lease_margin_s):
        return False
    manual = world.annotations.get(ANN_FAILOVER) == "now"
    return failover_blocker(replace(world, lease=None), world.spec, st, manual) is None


def agents_to_ask(status: VolumeStatus) -> list[str]:
    """The replica pods whose agents a tick asks for their status (one HTTP call each; an
    agent that does not answer costs the tick the call's whole timeout).

    While a failover runs, the planner judges only the target and the pods
    (``_resume_failover``); the old primary's answer decides nothing, and its node is
    usually dead. Asking it anyway made the tick that sees the target serving wait a
    timeout before the failover was recorded as done, on every volume of a failed node.
    """
    if status.failing_over:
        return [status.secondary.pod] if status.secondary is not None else []
    return [r.pod for r in (status.primary, status.secondary) if r is not None]


def replica_counts(volume: str, pods: Iterable[tuple[str, str]], placed: Mapping[str, Iterable[str]]) -> dict[str, int]:
    """Replicas of volumes other than ``volume`` per node (``World.placement``): from the
    agent pods seen (``(volume key, node)``) and from the nodes other volumes' loops have
    placed replicas on in statuses they wrote (``placed``: volume key -> nodes), whose pods
    may not exist or not be listed yet.

    Without the second, volumes applied together all saw the same empty nodes and all put
    their primaries on one node and their secondaries on another (bench-scale: 20 of 20
    primaries on node-1), which concentrated every full sync on two nodes and every primary
    in one failure."""
    nodes: dict[str, set[str]] = {}
    for key, node in pods:
        if key != volume and node:
            nodes.setdefault(key, set()).add(node)
    for key, where in placed.items():
        if key != volume:
            nodes.setdefault(key, set()).update(n for n in where if n)
    counts: dict[str, int] = {}
    for where in nodes.values():
        for node in where:
            counts[node] = counts.get(node, 0) + 1
    return counts


def pods_not_yet_seen(created: Iterable[str], cached: Container[str]) -> set[str]:
    """Pods this operator asked the API server to create that the cache does not show yet
    (counted from before the call: a create whose answer was lost may have been applied).

    While there are any, the volume's pods are read from the API server: a pod missing
    from a lagging cache would be judged gone, and a secondary placed a moment ago
    replaced before it ever started. A name the API server does not have either is
    dropped by that read (the create failed, or the pod is gone): it is judged gone."""
    return {p for p in created if p not in cached}


def volume_body_source(known_rv: str | None, cache_has_seen_known: bool, cached_present: bool) -> str:
    """Where this tick's ReplicatedVolume comes from: ``"cache"``, ``"own"`` (the version
    this loop last wrote or read) or ``"api"`` (a GET).

    Its status is written by this loop (a write planned from an older version, by another
    operator replica say, is refused: H19), and each plan starts from the status the
    last one persisted; so the body must never be older than the version this loop last
    wrote (``known_rv``). The cache is used once it has shown that version (events
    arrive in order, so what it holds then is that version or a newer one, or nothing
    if the volume was deleted since); before that, the loop's own copy of that version.
    """
    if known_rv is None:
        return "cache" if cached_present else "api"
    return "cache" if cache_has_seen_known else "own"


def node_change_matters(before: NodeView | None, after: NodeView | None) -> bool:
    """A node event worth waking every volume's loop for: the node appeared, went, or
    changed readiness, schedulability or labels (not a heartbeat)."""
    return before != after
