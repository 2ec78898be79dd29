"""kopf handlers: one level-triggered reconcile loop (a kopf daemon) per ReplicatedVolume.

Why a daemon and not create/update/field handlers: failover and checkpoints are driven by
*time* and by the state of pods, nodes, the Lease and the agents — none of which are events
on the ReplicatedVolume. Each tick observes everything fresh (:func:`observe`), asks the pure
:func:`pairvol.operator.decisions.plan` what to do, persists the planned status first and
then executes the actions. After an operator restart, kopf starts the daemon again and the
loop resumes from ``status`` and the agents' epochs; nothing else is remembered that matters
for safety (the grace-period clock restarts, which only delays a failover).

Reads come from shared watch caches (:mod:`pairvol.operator.informer`), not from the API
server on every tick; the rules that keep a lagging cache from causing a wrong decision are
in :mod:`pairvol.operator.decisions` (``lease_needs_fresh_read``, ``pods_not_yet_seen``,
``volume_body_source``). A change of the volume, of one of its pods or of a node's
readiness wakes the volume's loop at once; otherwise it ticks every reconcile interval
(the agents' status is polled over HTTP, which costs the API server nothing). The one read
that is not per volume — every namespace's agent pods, which placement spreads replicas
over — is made once per reconcile interval for all loops (:class:`informer.SharedRead`).

kopf peering (``PAIRVOL_PEERING``) keeps one operator replica active, but not strictly one at
a time: a replica pauses (and stops its daemons) only once it notices a peer of higher
priority, so the old replica's current tick can overlap the new one's first. What keeps a
plan made from an older status from being stored over a newer one is that the status write
is conditional on the resourceVersion the plan was made from (:meth:`Reconciler.persist`).
The caches run in every replica, paused or not, and so does the observation of each Lease's
record (:meth:`Context.lease_event`): a standby that takes over from a replica that died with a
volume's primary has watched that primary's Lease all along and needs no full Lease duration of
its own before it fails the volume over (docs/correctness.md, H5).
Without peering each process acts alone: run one replica only (the chart refuses more).
Deletion goes through a kopf finalizer (the delete handler below).
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import datetime
import logging
import os
import time
from collections.abc import Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any

import kopf
from aiohttp import web
from prometheus_client import generate_latest

from pairvol.api.spec import GROUP, PLURAL, VERSION, SpecError, parse_spec
from pairvol.api.status import Phase, VolumeStatus, parse_time, rfc3339
from pairvol.kube.client import Conflict, KubeClient, KubeError, merge_patch_to
from pairvol.kube.config import KubeConfig, load_config
from pairvol.kube.lease import LeaseObservation, lease_record
from pairvol.kube.names import OUT_OF_SYNC_ANNOTATION, RESYNC_ANNOTATION
from pairvol.kube.paths import (
    events_path,
    lease_path,
    netpol_path,
    nodes_path,
    pods_path,
    secrets_path,
    services_path,
    volume_path,
)
from pairvol.operator import decisions as d
from pairvol.operator import manifests as m
from pairvol.operator.agentclient import AgentClient, AgentError, LinkChanged
from pairvol.operator.informer import Informer, SharedRead
from pairvol.operator.metrics import OperatorMetrics

log = logging.getLogger(__name__)

ROLE_CALL_RETRY_S = 1.0
# a loop waits this long for the cache to show its own last write, then reads the volume
OWN_COPY_MAX_S = 5.0
ALL_VOLUMES = f"/apis/{GROUP}/{VERSION}/{PLURAL}"
ALL_LEASES = "/apis/coordination.k8s.io/v1/leases"


@dataclass
class Caches:
    """The watch caches, one per collection and watched namespace ("" = all namespaces,
    when the operator watches the whole cluster)."""

    nodes: Informer
    volumes: dict[str, Informer]
    pods: dict[str, Informer]
    leases: dict[str, Informer]

    @staticmethod
    def make(kube: KubeClient, namespaces: tuple[str, ...]) -> Caches:
        scopes = list(namespaces) or [""]
        agents = f"{m.APP_LABEL}={m.AGENT_APP}"
        return Caches(
            nodes=Informer(kube, nodes_path()),
            volumes={ns: Informer(kube, volume_path(ns) if ns else ALL_VOLUMES) for ns in scopes},
            pods={ns: Informer(kube, pods_path(ns) if ns else "/api/v1/pods", agents) for ns in scopes},
            leases={ns: Informer(kube, lease_path(ns) if ns else ALL_LEASES) for ns in scopes},
        )

    def all(self) -> list[Informer]:
        return [self.nodes, *self.volumes.values(), *self.pods.values(), *self.leases.values()]

    @staticmethod
    def synced(table: Mapping[str, Informer], namespace: str) -> Informer | None:
        """The cache for ``namespace``, once it has been listed (else None: read the API)."""
        inf = table.get(namespace) or table.get("")
        return inf if inf is not None and inf.synced.is_set() else None


@dataclass
class Context:
    """Process-wide state shared by all reconcilers (kopf ``memo``)."""

    config: m.OperatorConfig
    kube: KubeClient
    agents: AgentClient
    metrics: OperatorMetrics
    runner: web.AppRunner | None = None
    started: float = field(default_factory=time.time)
    caches: Caches | None = None
    loops: dict[str, Reconciler] = field(default_factory=dict)  # "ns/name" -> the running loop
    # "ns/name" -> the nodes of its replicas in the loop's last plan (decisions.replica_counts)
    placed: dict[str, set[str]] = field(default_factory=dict)
    # "ns/name" of the volumes whose loop's last plan is failing over or about to
    # (decisions.Plan.failing_over): the other volumes' re-protection waits for them
    failing_over: set[str] = field(default_factory=set)
    # every namespace's agent pods, read once per reconcile interval for all loops that place
    _agent_pods: SharedRead | None = None
    # (namespace, Lease name) -> since when this process has seen the Lease's current record
    # (monotonic). Kept by the Lease cache's events for the life of the process, whether or
    # not this replica acts: a standby that takes over has observed all along (H5)
    _lease_seen: dict[tuple[str, str], LeaseObservation] = field(default_factory=dict)

    def lease_observation(self, namespace: str, name: str) -> LeaseObservation:
        return self._lease_seen.setdefault((namespace, name), LeaseObservation())

    def lease_event(self, etype: str, obj: dict[str, Any]) -> None:
        """A Lease cache event: a new record restarts its observed age, the same one keeps it."""
        meta = obj.get("metadata") or {}
        key = (str(meta.get("namespace") or ""), str(meta.get("name") or ""))
        if not key[1].startswith(m.LEASE_PREFIX):
            return
        if etype == "DELETED":
            self._lease_seen.pop(key, None)  # a later look starts afresh
            return
        self.lease_observation(*key).age(lease_record(obj), time.monotonic())

    def agent_pods_everywhere(self) -> SharedRead:
        """The agent pods of all namespaces (placement spreads replicas over them all)."""
        if self._agent_pods is None:
            kube, selector = self.kube, f"{m.APP_LABEL}={m.AGENT_APP}"

            async def read() -> list[dict[str, Any]]:
                return await kube.list("/api/v1/pods", selector)

            self._agent_pods = SharedRead(read, self.config.reconcile_interval_s, time.monotonic)
        return self._agent_pods

    def failovers_besides(self, key: str) -> int:
        """How many volumes other than ``key`` are failing over (``World.failovers_elsewhere``)."""
        return len(self.failing_over - {key})

    def failover_over(self, key: str) -> None:
        """The loop of ``key`` no longer fails over: once no volume does, the loops whose
        re-protection waited for that tick at once, not after their reconcile interval."""
        if key not in self.failing_over:
            return
        self.failing_over.discard(key)
        if not self.failing_over:
            for loop in list(self.loops.values()):
                if loop.reprotect_held:
                    loop.wake.set()


_CTX: Context | None = None


def ctx() -> Context:
    if _CTX is None:
        raise RuntimeError("operator context not initialised (startup handler did not run)")
    return _CTX


# ----------------------------------------------------------------------- parsing


def _ready(conditions: list[Mapping[str, Any]] | None) -> bool:
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions or [])


def node_view(obj: Mapping[str, Any]) -> d.NodeView:
    meta, spec, status = obj.get("metadata") or {}, obj.get("spec") or {}, obj.get("status") or {}
    return d.NodeView(
        name=str(meta.get("name")),
        ready=_ready(status.get("conditions")),
        schedulable=not spec.get("unschedulable", False),
        labels=dict(meta.get("labels") or {}),
    )


def _last_line(text: Any) -> str:
    lines = [line.strip() for line in str(text or "").splitlines() if line.strip()]
    return lines[-1][:200] if lines else ""


def _terminated_reason(term: Mapping[str, Any]) -> str:
    """``Error, exit code 2: <last line of the termination message>`` — the agent pod asks
    for ``FallbackToLogsOnError``, so the cause (e.g. a port in use) reaches our Events."""
    text = f"{term.get('reason') or 'terminated'}, exit code {term.get('exitCode')}"
    message = _last_line(term.get("message"))
    return f"{text}: {message}" if message else text


def _container_reason(status: Mapping[str, Any]) -> str:
    for cs in status.get("containerStatuses") or []:
        state = cs.get("state") or {}
        term = state.get("terminated") or {}
        if term:
            return _terminated_reason(term)
        wait = state.get("waiting") or {}
        if wait.get("reason"):
            text = f"{wait['reason']}: {wait.get('message') or ''}".strip(": ")
            last = (cs.get("lastState") or {}).get("terminated") or {}
            return f"{text} (last: {_terminated_reason(last)})" if last else text
    return ""


def pod_view(obj: Mapping[str, Any]) -> d.PodView:
    meta, spec, status = obj.get("metadata") or {}, obj.get("spec") or {}, obj.get("status") or {}
    return d.PodView(
        reason=_container_reason(status),
        name=str(meta.get("name")),
        node=str(spec.get("nodeName") or ""),
        role=str((meta.get("labels") or {}).get(d.LABEL_ROLE, "")),
        phase=str(status.get("phase") or "Pending"),
        ready=_ready(status.get("conditions")),
        ip=str(status.get("podIP") or ""),
        deleting=bool(meta.get("deletionTimestamp")),
    )


def lease_view(
    obj: Mapping[str, Any] | None, observed_age_s: float, observed_at: float | None = None
) -> d.LeaseView | None:
    """``observed_age_s``: how long this operator has seen this very record (see
    :class:`pairvol.kube.lease.LeaseObservation`), as of the wall time ``observed_at``; the
    renewTime is not used for expiry."""
    if obj is None:
        return None
    spec = obj.get("spec") or {}
    ann = (obj.get("metadata") or {}).get("annotations") or {}
    oos_epoch, resync_epoch = _epoch_mark(ann.get(OUT_OF_SYNC_ANNOTATION)), _epoch_mark(ann.get(RESYNC_ANNOTATION))
    dur = spec.get("leaseDurationSeconds")
    return d.LeaseView(
        holder=spec.get("holderIdentity") or None,
        observed_age_s=observed_age_s,
        duration_s=None if dur is None else float(dur),
        out_of_sync_epoch=oos_epoch,
        resync_epoch=resync_epoch,
        observed_at=observed_at,
    )


@dataclass(frozen=True)
class LeaseRead:
    """The volume's Lease as one look found it. ``sent`` (monotonic): the latest moment it is
    known to have been current (a GET's sending, a cache's reading); ``received``: when it
    was in hand; ``wall``: the wall time at ``sent``."""

    obj: dict[str, Any] | None
    fresh: bool  # from the API server (else from the cache)
    sent: float
    received: float
    wall: float


def _epoch_mark(value: Any) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _secret_value(secret: Mapping[str, Any], key: str) -> str | None:
    data = secret.get("data") or {}
    if key in data:
        return base64.b64decode(data[key]).decode()
    sd = secret.get("stringData") or {}
    return str(sd[key]) if key in sd else None


# ------------------------------------------------------------- the volume's objects


class NameTaken(KubeError):
    """An object the volume needs exists under its name but belongs to something else."""

    def __init__(self, message: str) -> None:
        super().__init__(409, message)


def _uid(body: Mapping[str, Any] | None) -> str:
    return str(((body or {}).get("metadata") or {}).get("uid") or "")


async def create_owned(kube: KubeClient, collection: str, manifest: Mapping[str, Any], uid: str) -> dict[str, Any]:
    """Create the volume's object, or take the existing one of that name only if it is the
    volume's own (an earlier tick's, a previous operator's): never another's
    (:func:`pairvol.operator.manifests.owned_by`), which raises :class:`NameTaken`."""
    try:
        return await kube.create(collection, manifest)
    except Conflict:
        pass
    existing = await kube.get(f"{collection}/{manifest['metadata']['name']}")
    if not m.owned_by(existing, uid):
        raise NameTaken(m.name_taken_message({"kind": manifest.get("kind"), **existing}))
    return existing


async def delete_owned(kube: KubeClient, path: str, uid: str) -> bool:
    """Delete the object at ``path`` if it is the volume's own; another's of that name stays."""
    obj = await kube.get_or_none(path)
    if obj is None or not m.owned_by(obj, uid):
        return False
    try:
        return await kube.delete(path, uid=_uid(obj))
    except Conflict:  # replaced under the same name since the read: not ours
        return False


# --------------------------------------------------------------------- reconciler


class Reconciler:
    """The loop for one volume. Memory here is an optimisation, never needed for safety."""

    def __init__(self, name: str, namespace: str) -> None:
        self.name, self.namespace = name, namespace
        self.key = f"{namespace}/{name}"
        self.suspect_since: dict[str, float] = {}
        self.token: str | None = None
        self.last_written: dict[str, Any] | None = None
        self.last_write_at = 0.0
        self.infra_ok = False
        self.export_key = True  # the agents' Secret holds the export's own key (ensure_infra)
        self.restart_backoff = 0.0
        # the one agent role call that may run long (start secondary/primary), in background
        self.call: asyncio.Task[None] | None = None
        # set by the caches when the volume, one of its pods or a node changed: tick now
        self.wake = asyncio.Event()
        # the version of the volume this loop last wrote or read (decisions.volume_body_source)
        self.body: dict[str, Any] | None = None
        self.known_rv: str | None = None
        self.known_at = 0.0
        self.read_from_api = False  # a conditional write was refused: the next read is a GET
        # pods this loop created that the cache has not shown yet (decisions.pods_not_yet_seen)
        self.created: set[str] = set()
        # (volume key, node) of the other volumes' agent pods, listed while placing a replica
        self.other_pods: list[tuple[str, str]] = []
        # the message of the last NameTaken reported for this volume (one Event per cause)
        self.name_taken: str | None = None
        # the last plan held re-protection back for failovers elsewhere, and since when it
        # has waited (decisions.reprotect_hold, next_reprotect_held_since)
        self.reprotect_held = False
        self.reprotect_held_since: float | None = None
        self.planned = False  # this loop has made a plan (it says whether the volume fails over)

    # ---------------------------------------------------------------- reading

    def remember(self, body: Mapping[str, Any]) -> None:
        self.body = dict(body)
        self.known_rv = str((body.get("metadata") or {}).get("resourceVersion") or "") or None
        self.known_at = time.monotonic()
        self.read_from_api = False

    def forget_body(self) -> None:
        """The volume changed behind this loop's back: the next tick reads it from the API
        server (a cache may not have the change yet) and plans afresh."""
        self.body, self.known_rv, self.last_written = None, None, None
        self.read_from_api = True

    async def read_volume(self) -> dict[str, Any] | None:
        """This tick's ReplicatedVolume: never older than what this loop last wrote."""
        c = ctx()
        inf = Caches.synced(c.caches.volumes, self.namespace) if c.caches else None
        source = "api"
        cached = None
        if inf is not None and not self.read_from_api:
            cached = inf.get(self.namespace, self.name)
            seen = self.known_rv is not None and inf.has_seen(self.namespace, self.name, self.known_rv)
            source = d.volume_body_source(self.known_rv, seen, cached is not None)
            if source == "own" and time.monotonic() - self.known_at > OWN_COPY_MAX_S:
                source = "api"  # e.g. a relist skipped that version: ask the API server
        if source == "cache":
            if cached is not None:
                self.remember(cached)
            return cached
        if source == "own":
            return self.body
        body = await c.kube.get_or_none(volume_path(self.namespace, self.name))
        if body is not None:
            self.remember(body)
        return body

    async def read_nodes(self) -> list[dict[str, Any]]:
        c = ctx()
        if c.caches is not None and c.caches.nodes.synced.is_set():
            return c.caches.nodes.items()
        return await c.kube.list(nodes_path())

    async def read_pods(self) -> list[dict[str, Any]]:
        c = ctx()
        inf = Caches.synced(c.caches.pods, self.namespace) if c.caches else None
        if inf is not None:
            cached = inf.items(self.namespace, {d.LABEL_VOLUME: self.name, m.APP_LABEL: m.AGENT_APP})
            names = {str((p.get("metadata") or {}).get("name")) for p in cached}
            self.created -= names
            if not d.pods_not_yet_seen(self.created, names):
                return cached
        selector = f"{d.LABEL_VOLUME}={self.name},{m.APP_LABEL}={m.AGENT_APP}"
        fresh = await c.kube.list(pods_path(self.namespace), selector)
        # what the API server does not have either is gone (or was never created): stop waiting
        self.created &= {str((p.get("metadata") or {}).get("name")) for p in fresh}
        return fresh

    async def read_lease(self) -> LeaseRead:
        """The volume's Lease from the cache, or from the API server while the cache has not
        been listed or shows a record this process has already seen replaced (it lags)."""
        c = ctx()
        name = m.lease_name(self.name)
        inf = Caches.synced(c.caches.leases, self.namespace) if c.caches else None
        if inf is not None:
            at, wall = time.monotonic(), time.time()
            obj = inf.get(self.namespace, name)
            if obj is None or not c.lease_observation(self.namespace, name).replaced(lease_record(obj)):
                return LeaseRead(obj, False, at, at, wall)
        return await self.get_lease()

    async def get_lease(self) -> LeaseRead:
        sent, wall = time.monotonic(), time.time()
        obj = await ctx().kube.get_or_none(lease_path(self.namespace, m.lease_name(self.name)))
        return LeaseRead(obj, True, sent, time.monotonic(), wall)

    def lease_view(self, read: LeaseRead) -> d.LeaseView | None:
        """The Lease with the age of its record as this process has seen it, as of the
        moment the read is known to reflect (H5: a restarted operator has seen nothing and
        waits a full Lease duration before failing over; a standby has watched all along)."""
        seen = ctx().lease_observation(self.namespace, m.lease_name(self.name))
        record = lease_record(read.obj) if read.obj is not None else None
        age = seen.age(record, read.received, current_at=read.sent)
        return lease_view(read.obj, age, observed_at=read.wall)

    # ---------------------------------------------------------------- observe

    async def observe(self, body: Mapping[str, Any]) -> d.World:
        c = ctx()
        meta = body.get("metadata") or {}
        status = VolumeStatus.from_dict(body.get("status"))
        spec: Any
        try:
            spec = parse_spec(body.get("spec") or {}, name=self.name)
        except SpecError as exc:
            spec = exc
        nodes_raw, pods_raw, lease_read = await asyncio.gather(
            self.read_nodes(), self.read_pods(), self.read_lease()
        )
        pods = {p.name: p for p in map(pod_view, pods_raw)}
        self.other_pods = []
        if status.primary is None or status.secondary is None:
            for p in await c.agent_pods_everywhere().get():
                pm = p.get("metadata") or {}
                key = f"{pm.get('namespace')}/{(pm.get('labels') or {}).get(d.LABEL_VOLUME)}"
                self.other_pods.append((key, str((p.get("spec") or {}).get("nodeName") or "")))
        agents: dict[str, d.AgentView | None] = {}
        token = await self._token() if not isinstance(spec, SpecError) else None
        targets = d.agents_to_ask(status)

        async def one(pod_name: str) -> None:
            pod = pods.get(pod_name)
            if pod is None or not pod.ip or pod.phase != "Running" or token is None:
                agents[pod_name] = None
                return
            try:
                raw = await c.agents.status(f"{pod.ip}:{d.API_PORT}", token)
                agents[pod_name] = d.AgentView.from_status(raw)
            except AgentError as exc:
                log.debug("%s: agent of %s: %s", self.key, pod_name, exc)
                agents[pod_name] = None

        await asyncio.gather(*(one(p) for p in targets))
        world = d.World(
            name=self.name,
            namespace=self.namespace,
            generation=int(meta.get("generation") or 0),
            spec=spec,
            status=status,
            now=time.time(),
            annotations=dict(meta.get("annotations") or {}),
            nodes=[self._agent_may_run(node_view(n)) for n in nodes_raw],
            pods=pods,
            agents=agents,
            lease=self.lease_view(lease_read),
            settings=d.Settings(
                lease_margin_s=c.config.lease_margin_s,
                restart_in_place_window_s=c.config.restart_in_place_window_s,
                reprotect_hold_max_s=c.config.reprotect_hold_max_s,
            ),
            agent_call_in_flight=self.call is not None and not self.call.done(),
            created=parse_time(meta.get("creationTimestamp")) or 0.0,
        )
        suspects, seen = self.with_grace(world)
        if not lease_read.fresh and d.lease_needs_fresh_read(seen):
            suspects, seen = self.with_grace(dataclasses.replace(world, lease=self.lease_view(await self.get_lease())))
        # remembered only once this look is complete: a failed read leaves it as it was
        self.suspect_since = suspects
        return seen

    def with_grace(self, world: d.World) -> tuple[dict[str, float], d.World]:
        """The grace period's clock from the last tick's (what to remember: without the
        Lease's part), and ``world`` with the clock the plan uses (d.grace_started)."""
        suspects = d.next_suspect_since(self.suspect_since, world)
        return suspects, dataclasses.replace(world, suspect_since=d.grace_started(suspects, world))

    @staticmethod
    def _agent_may_run(node: d.NodeView) -> d.NodeView:
        """PAIRVOL_AGENT_NODE_SELECTOR limits where new replicas go (not where existing run)."""
        sel = ctx().config.agent_node_selector
        if any(node.labels.get(k) != v for k, v in sel.items()):
            return d.NodeView(node.name, node.ready, False, node.labels)
        return node

    async def _token(self) -> str | None:
        """The agents' API token, from the volume's own Secret only (never another's of its name)."""
        if self.token is None:
            sec = await ctx().kube.get_or_none(secrets_path(self.namespace, m.secret_name(self.name)))
            if sec is not None and m.owned_by(sec, _uid(self.body)):
                self.token = _secret_value(sec, "token")
        return self.token

    async def ensure_infra(self, body: Mapping[str, Any]) -> None:
        """Secret and Services: created once, idempotently (also after a restart). An object
        of one of their names that is not this volume's is never used: the volume says so
        (status and a Warning Event) and this raises :class:`NameTaken`, so no agent starts."""
        if self.infra_ok:
            return
        try:
            await self._ensure_infra(body)
        except NameTaken as exc:
            await self.report_name_taken(body, str(exc))
            raise
        self.name_taken = None
        self.infra_ok = True

    async def _ensure_infra(self, body: Mapping[str, Any]) -> None:
        c, ns, uid = ctx(), self.namespace, _uid(body)
        agents_secret = await create_owned(c.kube, secrets_path(ns), m.secret_manifest(self.name, ns, body), uid)
        # the workload's Secret holds the export's key, derived from the agents' Secret
        # (which an older version made without one: its export keeps the link's key)
        own_key = _secret_value(agents_secret, "export-psk")
        export_psk = own_key or _secret_value(agents_secret, "psk")
        if export_psk is None:
            secret = m.secret_name(self.name)
            raise KubeError(0, f"Secret {secret} has no key psk: delete it, the operator makes a new one")
        export_secret = m.export_secret_manifest(self.name, ns, body, export_psk)
        await create_owned(c.kube, secrets_path(ns), export_secret, uid)
        self.export_key = own_key is not None
        for svc in m.services_manifests(self.name, ns, body):
            await create_owned(c.kube, services_path(ns), svc, uid)
        if c.config.per_volume_network_policy:
            await create_owned(c.kube, netpol_path(ns), m.network_policy_manifest(self.name, ns, body), uid)

    async def report_name_taken(self, body: Mapping[str, Any], message: str) -> None:
        """Status (the message; phase Pending while nothing was placed) and one Warning Event
        per cause; the loop retries with backoff and goes on by itself once the name is free."""
        if message == self.name_taken:
            return
        self.name_taken = message
        await self.event(body, "Warning", "NameTaken", message)
        path = volume_path(self.namespace, self.name, status=True)
        status = {"message": message}
        if VolumeStatus.from_dict(body.get("status")).primary is None:
            status["phase"] = Phase.PENDING.value
        self.remember(await ctx().kube.merge_patch(path, {"status": status}))
        self.last_written = None  # the next plan's status is written whatever it is

    # ---------------------------------------------------------------- persist

    async def persist(self, plan: d.Plan, base: Mapping[str, Any], interval_s: int | None) -> bool:
        """Write the planned status if it changed; cosmetic changes are rate-limited.

        ``base``: the version of the volume the plan was made from. The write is conditional
        on it (its resourceVersion): a plan made from a status someone has changed since — an
        operator replica that still runs its last tick while the next one runs its first, a
        write of this loop that the API server applied after its client gave up — is never
        stored over the newer status, and its actions are not run (the Durability rule:
        an epoch handed out is in the stored status). And the patch turns that version's
        status into exactly the planned one: a field the plan no longer has is removed, not
        kept (:func:`~pairvol.kube.client.merge_patch_to`). A plan that acts on pods is
        written even when its status is the one last written, for the version check alone
        (:func:`~pairvol.operator.decisions.acts_on_pods`)."""
        c = ctx()
        new = plan.status.to_dict()
        if new == self.last_written and not d.acts_on_pods(plan.actions):
            # stored already (maybe by an earlier operator process): exported all the same
            self.export(plan.status, interval_s)
            return True  # role calls name their epoch: the agents refuse an outdated one
        if plan.cosmetic and time.monotonic() - self.last_write_at < 1.0 and not plan.actions:
            return True
        meta = base.get("metadata") or {}
        patch: dict[str, Any] = {"status": merge_patch_to(base.get("status"), new)}
        if meta.get("resourceVersion"):
            patch["metadata"] = {"resourceVersion": meta["resourceVersion"]}
        try:
            path = volume_path(self.namespace, self.name, status=True)
            self.remember(await c.kube.merge_patch(path, patch))
        except Conflict:
            log.info("%s: the volume changed since this plan read it: not acting, reading it again", self.key)
            self.forget_body()
            return False
        except KubeError as exc:
            log.warning("%s: status write failed, not acting this tick: %s", self.key, exc)
            return False
        c.metrics.status_writes.inc()
        self.last_written, self.last_write_at = new, time.monotonic()
        self.export(plan.status, interval_s)
        return True

    def export(self, status: VolumeStatus, interval_s: int | None) -> None:
        """The volume's phase and checkpoint gauges, from the status stored, and its checkpoint
        interval (``interval_s``, of the spec the plan was made from; None: the spec is invalid
        and nothing is cut). Called for every
        plan that is stored or found stored, not only after a write: a restarted operator's
        plan for a volume stuck where it is (Failed, Degraded) writes nothing, and the alerts
        on those phases read these gauges. (A coalesced cosmetic plan follows a write made
        less than a second before, which exported.)"""
        metrics = ctx().metrics
        metrics.set_phase(self.key, status.phase.value)
        cp = status.checkpoint or {}
        metrics.set_checkpoint(self.namespace, self.name, parse_time(cp.get("time")))
        metrics.set_checkpoint_interval(self.namespace, self.name, interval_s)

    # ---------------------------------------------------------------- execute

    async def execute(self, body: Mapping[str, Any], world: d.World, action: d.Action) -> bool:
        """Run one action; False if it took no effect and the loop must not tick again at
        once for it (a refused label patch or cut: the next plan asks again, after the
        reconcile interval). A failure that stops the plan raises."""
        c = ctx()
        ns, token = self.namespace, self.token or ""
        kind = type(action).__name__
        try:
            match action:
                case d.CreatePod(pod=pod, node=node, role=role):
                    assert not isinstance(world.spec, SpecError)
                    await self.ensure_infra(body)
                    manifest = m.pod_manifest(
                        pod=pod,
                        node=node,
                        role=role,
                        volume=self.name,
                        namespace=ns,
                        spec=world.spec,
                        owner=body,
                        config=c.config,
                        export_key=self.export_key,
                    )
                    # before the call: a create whose answer is lost may have been applied, and
                    # a lagging cache would have it judged gone and another replica placed
                    # (read_pods forgets the name once the API server does not have it)
                    self.created.add(pod)
                    await c.kube.create_if_missing(pods_path(ns), manifest)
                    log.info("%s: created %s pod %s on %s", self.key, role, pod, node)
                case d.DeletePod(pod=pod, reason=reason):
                    await c.kube.delete(pods_path(ns, pod))  # the pod's own grace: the agent stops cleanly
                    log.info("%s: deleted pod %s: %s", self.key, pod, reason)
                case d.SetRole(pod=pod, role=role):
                    try:
                        await c.kube.merge_patch(pods_path(ns, pod), {"metadata": {"labels": {d.LABEL_ROLE: role}}})
                    except KubeError as exc:
                        # every tick plans it again (H18); a patch the API server keeps refusing
                        # (a webhook that is down) must not stop the plan's failover or cut
                        c.metrics.actions.labels(kind, "error").inc()
                        log.warning("%s: labelling pod %s %s failed (the next tick tries again): %s",
                                    self.key, pod, role, exc)
                        return False
                case d.StartSecondary(address=ip, epoch=epoch):
                    self.background(kind, c.agents.secondary(f"{ip}:{d.API_PORT}", token, epoch))
                    return True
                case d.StartPrimary(
                    address=ip,
                    epoch=epoch,
                    peer=peer,
                    sync=sync,
                    peer_epoch=peer_epoch,
                    peer_disk=peer_disk,
                    peer_api=peer_api,
                ):
                    call = c.agents.primary(
                        f"{ip}:{d.API_PORT}", token, epoch, peer, sync, peer_epoch, peer_disk, peer_api
                    )
                    self.background(kind, call)
                    return True
                case d.Checkpoint(address=ip, link_serial=serial):
                    try:
                        res = await c.agents.checkpoint(f"{ip}:{d.API_PORT}", token, serial)
                        c.metrics.checkpoints.labels("ok").inc()
                        log.debug("%s: checkpoint %s", self.key, res)
                    except LinkChanged as exc:
                        # S5: no failure; the restore point stands, and the next cut names the new link
                        c.metrics.checkpoints.labels("refused").inc()
                        requested = world.annotations.get(d.ANN_CHECKPOINT) == "now"
                        asked = "; the requested checkpoint was not cut, request it again" if requested else ""
                        await self.event(body, "Normal", "CheckpointRefused", f"{action.pod}: {exc.message}{asked}")
                        return False
                    except AgentError:
                        c.metrics.checkpoints.labels("error").inc()
                        raise
                case d.DoFailover(address=ip, epoch=epoch, mode=mode, trigger=trigger):
                    res = await c.agents.failover(f"{ip}:{d.API_PORT}", token, epoch, mode, trigger)
                    log.warning("%s: failover to %s done: %s", self.key, action.pod, res)
                case d.Grow():
                    self.background(kind, self._grow(action, token))
                    return True
                case d.ClearAnnotation(key=key):
                    self.remember(
                        await c.kube.merge_patch(volume_path(ns, self.name), {"metadata": {"annotations": {key: None}}})
                    )
                case d.Event(type=etype, reason=reason, message=message):
                    await self.event(body, etype, reason, message)
                case d.FailoverDone(duration_s=dur, mode=mode, reason=reason):
                    c.metrics.failover_done(mode, d.failover_trigger(reason), dur)
                case d.RestartedInPlace(trigger=trigger):
                    c.metrics.restarts_in_place.labels(trigger).inc()
            c.metrics.actions.labels(kind, "ok").inc()
            return True
        except (KubeError, AgentError) as exc:
            c.metrics.actions.labels(kind, "error").inc()
            log.warning("%s: %s failed: %s", self.key, kind, exc)
            raise

    async def _grow(self, g: d.Grow, token: str) -> None:
        """The grow's agent calls in their order (decisions.Grow); each is idempotent, so a
        grow cut short is finished by the next one the planner asks for."""
        agents = ctx().agents
        primary, secondary = f"{g.primary_address}:{d.API_PORT}", f"{g.secondary_address}:{d.API_PORT}"
        await agents.stop(primary, token, g.primary_epoch)  # never a later incarnation's peer
        await agents.resize(secondary, token, g.secondary_epoch, g.size)
        await agents.resize(primary, token, g.primary_epoch, g.size)
        log.info("%s: grew %s and %s to %d bytes", self.key, g.secondary_pod, g.primary_pod, g.size)

    def background(self, kind: str, call: Coroutine[Any, Any, Any]) -> None:
        """Role calls may take long (a full sync starts); the loop must keep watching the
        primary meanwhile, so they run as a task and the planner waits for their answer."""
        c = ctx()

        async def run() -> None:
            try:
                await call
                c.metrics.actions.labels(kind, "ok").inc()
            except AgentError as exc:
                c.metrics.actions.labels(kind, "error").inc()
                log.warning("%s: %s failed: %s", self.key, kind, exc)
                # the planner repeats a failed role call (each time with a new epoch): not
                # faster than this, so a call that fails at once does not spin
                await asyncio.sleep(ROLE_CALL_RETRY_S)

        self.call = asyncio.create_task(run(), name=f"{self.key}-{kind}")

    async def event(self, body: Mapping[str, Any], etype: str, reason: str, message: str) -> None:
        meta = body.get("metadata") or {}
        now = rfc3339(time.time())
        ev = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": f"{self.name}.{time.time_ns():x}", "namespace": self.namespace},
            "involvedObject": {
                "apiVersion": f"{GROUP}/{VERSION}",
                "kind": "ReplicatedVolume",
                "name": self.name,
                "namespace": self.namespace,
                "uid": meta.get("uid"),
            },
            "type": etype,
            "reason": reason,
            "message": message[:1024],
            "source": {"component": "pairvol-operator"},
            "reportingComponent": "pairvol-operator",
            "reportingInstance": os.environ.get("PAIRVOL_OPERATOR_POD_NAME", "local"),
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        try:
            await ctx().kube.create(events_path(self.namespace), ev)
        except KubeError as exc:  # events are best effort, never block the reconcile
            log.debug("event not posted: %s", exc)
        log.log(logging.WARNING if etype == "Warning" else logging.INFO, "%s: %s: %s", self.key, reason, message)

    # ---------------------------------------------------------------- loop

    async def tick(self) -> bool:
        """One observe-plan-persist-act round; True if something was done (tick again now)."""
        body = await self.read_volume()
        if body is None or (body.get("metadata") or {}).get("deletionTimestamp"):
            return False
        if self.last_written is None:
            self.last_written = VolumeStatus.from_dict(body.get("status")).to_dict() if body.get("status") else None
        if not self.planned and VolumeStatus.from_dict(body.get("status")).failing_over:
            # before this loop's first plan (an operator that just started), the stored
            # status says whether the volume fails over: the others' re-protection waits for it
            ctx().failing_over.add(self.key)
        if not isinstance(body.get("spec"), dict):
            return False
        world = await self.observe(body)
        if not isinstance(world.spec, SpecError) and world.status.primary is None:
            await self.ensure_infra(body)
            await self._token()
        c = ctx()
        volumes = await all_volumes(c) if world.status.primary is None else []
        if world.status.primary is None or world.status.secondary is None:
            # counted right before planning, and this plan's nodes recorded right after, with
            # no await in between: loops placing replicas at the same moment see each other
            world = dataclasses.replace(world, placement=d.replica_counts(self.key, self.other_pods, c.placed))
        if world.status.primary is None:
            world = dataclasses.replace(world, volume_dirs=volume_dirs(self.key, volumes, c))
        # like the placement: the other loops' failovers as their last plans left them, and
        # this plan's recorded right after it, with no await in between
        world = dataclasses.replace(
            world, failovers_elsewhere=c.failovers_besides(self.key), reprotect_held_since=self.reprotect_held_since
        )
        plan = d.plan(world)
        c.placed[self.key] = {r.node for r in (plan.status.primary, plan.status.secondary) if r is not None}
        self.note_failovers(world, plan)
        interval_s = None if isinstance(world.spec, SpecError) else world.spec.checkpoint_interval_s
        if not await self.persist(plan, body, interval_s):
            return False
        acted = False
        for action in plan.actions:
            took_effect = await self.execute(body, world, action)
            acted = acted or (took_effect and not isinstance(action, d.Event))
        if any(isinstance(a, d.Event) and a.reason == "BringUpRestarted" for a in plan.actions):
            # agents that cannot start will not start better by retrying in a tight loop
            self.restart_backoff = min(30.0, max(1.0, self.restart_backoff * 2))
            log.warning("%s: bring-up failed, next attempt in %.0fs", self.key, self.restart_backoff)
            await asyncio.sleep(self.restart_backoff)
        elif world.status.phase in (Phase.REPLICATING, Phase.SYNCING):
            self.restart_backoff = 0.0
        return acted

    def note_failovers(self, world: d.World, plan: d.Plan) -> None:
        """Record what this plan says about failovers: whether this volume is failing over
        (the others' re-protection waits for it) and whether its own re-protection waits."""
        c = ctx()
        if plan.reprotect_held and not self.reprotect_held:
            log.info("%s: re-protection waits: %d other volume(s) failing over", self.key, world.failovers_elsewhere)
        elif self.reprotect_held and not plan.reprotect_held:
            since = world.reprotect_held_since
            waited = world.now - since if since is not None else 0.0
            log.info("%s: re-protection goes on after %.1fs (%d other volume(s) failing over)",
                     self.key, waited, world.failovers_elsewhere)
        self.reprotect_held, self.planned = plan.reprotect_held, True
        self.reprotect_held_since = d.next_reprotect_held_since(world, plan)
        if plan.failing_over:
            c.failing_over.add(self.key)
        else:
            c.failover_over(self.key)

    async def run(self, stopped: Any) -> None:
        c = ctx()
        backoff = c.config.reconcile_interval_s
        c.loops[self.key] = self
        try:
            while not stopped:
                self.wake.clear()
                try:
                    acted = await self.tick()
                    c.metrics.reconciles.labels("ok").inc()
                    backoff = c.config.reconcile_interval_s
                    if acted:
                        continue
                except (KubeError, AgentError) as exc:
                    c.metrics.reconciles.labels("error").inc()
                    log.info("%s: tick failed (retrying in %.1fs): %s", self.key, backoff, exc)
                    backoff = min(5.0, backoff * 2)
                await self.nap(stopped, backoff)
        finally:
            if c.loops.get(self.key) is self:
                del c.loops[self.key]
                c.placed.pop(self.key, None)
                c.failover_over(self.key)
            # also when kopf cancels the daemon: a replica that no longer manages the
            # volume must not keep exporting its last phase or checkpoint (alerts take the max)
            c.metrics.set_phase(self.key, None)
            c.metrics.set_checkpoint(self.namespace, self.name, None)
            c.metrics.set_checkpoint_interval(self.namespace, self.name, None)
            if self.call is not None and not self.call.done():
                self.call.cancel()

    async def nap(self, stopped: Any, seconds: float) -> None:
        """Until the next tick: ``seconds``, or less when woken or stopped."""
        waits = [asyncio.ensure_future(self.wake.wait()), asyncio.ensure_future(stopped.wait(seconds))]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()


async def all_volumes(c: Context) -> list[dict[str, Any]]:
    """Every ReplicatedVolume this operator serves: from the watch caches, or from the API
    server for a cache not listed yet."""
    if c.caches is None:
        paths = [volume_path(ns) for ns in c.config.watch_namespaces] or [ALL_VOLUMES]
        return [v for path in paths for v in await c.kube.list(path)]
    out: list[dict[str, Any]] = []
    for inf in c.caches.volumes.values():
        out += inf.items() if inf.synced.is_set() else await c.kube.list(inf.path)
    return out


def volume_dirs(key: str, volumes: list[dict[str, Any]], c: Context) -> list[d.VolumeDir]:
    """The data directories of the volumes other than ``key``: those read, and those of this
    process's loops, whose replicas in their last plan (``Context.placed``) count at once,
    before a status saying so has been written or seen. No await: called right before
    planning, so that two loops placing at the same moment see each other."""
    bodies = {loop.key: loop.body for loop in c.loops.values() if loop.body is not None}
    for v in volumes:
        vm = v.get("metadata") or {}
        bodies[f"{vm.get('namespace')}/{vm.get('name')}"] = v
    out = []
    for k, v in bodies.items():
        vm, spec = v.get("metadata") or {}, v.get("spec") or {}
        host = (spec.get("storage") or {}).get("hostPath", "/var/lib/pairvol") if isinstance(spec, dict) else None
        if k == key or not isinstance(host, str) or not host.startswith("/"):
            continue  # a hostPath that is no absolute path is refused: that volume places nothing
        status = VolumeStatus.from_dict(v.get("status"))
        placed = bool(c.placed[k]) if k in c.placed else status.primary is not None
        nodes = tuple(sorted(set(status.data_nodes) | c.placed.get(k, set())))
        path = d.data_dir_of(host, str(vm.get("namespace")), str(vm.get("name")))
        out.append(d.VolumeDir(k, path, parse_time(vm.get("creationTimestamp")) or 0.0, placed, nodes))
    return out


# ------------------------------------------------------------------ kopf handlers

RESOURCE = (GROUP, VERSION, PLURAL)


# the configuration of kopf's last login: its key material (in memory, see pairvol.kube.config)
# must stay open while kopf may build connections from it
_LOGIN: KubeConfig | None = None


@kopf.on.login()
async def login(**_: Any) -> Any:
    """kopf's credentials, from the same loader as ours: kopf calls this again after a 401,
    so a rotated token file or an expired exec credential is read afresh."""
    global _LOGIN
    cfg = await load_config(None)
    creds = await asyncio.to_thread(cfg.credentials)  # may run an exec plugin
    previous, _LOGIN = _LOGIN, cfg
    if previous is not None:
        previous.close()
    return kopf.ConnectionInfo(
        server=creds.server,
        token=creds.token,
        ca_path=creds.ca_path,
        insecure=creds.insecure,
        certificate_path=creds.cert_path,
        private_key_path=creds.key_path,
        default_namespace=creds.namespace,
        scheme="Bearer" if creds.token else None,
    )


async def _serve_metrics(request: web.Request) -> web.Response:
    data = generate_latest(ctx().metrics.registry)
    return web.Response(body=data, content_type="text/plain", charset="utf-8")


async def _serve_health(request: web.Request) -> web.Response:
    return web.json_response({"ok": True, "uptime": time.time() - ctx().started})


def start_caches(c: Context) -> Caches:
    """The watch caches, wired to wake the loops whose volume an event concerns."""
    caches = Caches.make(c.kube, c.config.watch_namespaces)

    def wake(namespace: str, name: str, own_rv: str | None = None) -> None:
        loop = c.loops.get(f"{namespace}/{name}")
        if loop is not None and (own_rv is None or own_rv != loop.known_rv):
            loop.wake.set()

    def on_volume(etype: str, obj: dict[str, Any], before: dict[str, Any] | None) -> None:
        meta = obj.get("metadata") or {}
        # this loop's own write needs no second look
        wake(str(meta.get("namespace")), str(meta.get("name")), str(meta.get("resourceVersion") or ""))

    def on_pod(etype: str, obj: dict[str, Any], before: dict[str, Any] | None) -> None:
        meta = obj.get("metadata") or {}
        volume = (meta.get("labels") or {}).get(d.LABEL_VOLUME)
        if volume:
            wake(str(meta.get("namespace")), str(volume))

    def on_node(etype: str, obj: dict[str, Any], before: dict[str, Any] | None) -> None:
        after = None if etype == "DELETED" else node_view(obj)
        if d.node_change_matters(node_view(before) if before is not None else None, after):
            for loop in list(c.loops.values()):
                loop.wake.set()

    def on_lease(etype: str, obj: dict[str, Any], before: dict[str, Any] | None) -> None:
        c.lease_event(etype, obj)

    caches.nodes.subscribe(on_node)
    for inf in caches.leases.values():
        inf.subscribe(on_lease)
    for inf in caches.volumes.values():
        inf.subscribe(on_volume)
    for inf in caches.pods.values():
        inf.subscribe(on_pod)
    for inf in caches.all():
        inf.start()
    return caches


@kopf.on.startup()
async def startup(settings: Any, **_: Any) -> None:
    global _CTX
    config = m.OperatorConfig.from_env()
    kube = KubeClient(await load_config(None))
    _CTX = Context(config=config, kube=kube, agents=AgentClient(), metrics=OperatorMetrics())
    _CTX.caches = start_caches(_CTX)
    settings.persistence.finalizer = "pairvol.io/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="pairvol.io")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix="pairvol.io", key="last-handled-configuration"
    )
    settings.posting.level = logging.WARNING
    settings.peering.mandatory = bool(config.peering)
    settings.peering.priority = config.peering_priority
    settings.peering.lifetime = config.peering_lifetime_s
    settings.watching.server_timeout = 60
    # Watching named namespaces (the chart's mode): the chart grants no cluster-wide
    # namespace list/watch, so tell kopf not to observe namespaces (nor CRDs after its
    # first scan; the chart installs the CRDs before the operator starts).
    settings.scanning.disabled = bool(config.watch_namespaces)
    if config.metrics_port:
        app = web.Application()
        app.router.add_get("/metrics", _serve_metrics)
        app.router.add_get("/healthz", _serve_health)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "0.0.0.0", config.metrics_port).start()
        _CTX.runner = runner
    log.info("pairvol operator started: %s", config)


@kopf.on.cleanup()
async def cleanup(**_: Any) -> None:
    global _CTX
    c, _CTX = _CTX, None
    if c is not None:
        for inf in c.caches.all() if c.caches else []:
            await inf.stop()
        if c.runner is not None:
            await c.runner.cleanup()
        await c.agents.close()
        await c.kube.close()


@kopf.daemon(*RESOURCE, cancellation_timeout=10.0, initial_delay=0)
async def volume_daemon(**kw: Any) -> None:
    await Reconciler(str(kw["name"]), str(kw["namespace"])).run(kw["stopped"])


# How long one call of the finalizer waits for pods to go before it hands back to kopf:
# a deletion that takes a few seconds is normal and must not log (kopf logs a
# TemporaryError at ERROR); one that takes longer is worth that line.
DELETE_PATIENCE_S = 30.0


@kopf.on.delete(*RESOURCE)
async def on_delete(**kw: Any) -> None:
    """Finalizer: stop agents, delete pods and Services, keep or wipe data per reclaimPolicy."""
    name, namespace = str(kw["name"]), str(kw["namespace"])
    runtime = kw.get("runtime")
    before = runtime.total_seconds() if isinstance(runtime, datetime.timedelta) else 0.0
    t0 = time.monotonic()
    told = None
    while True:
        elapsed = before + time.monotonic() - t0
        waiting = await _finalize(name, namespace, kw["body"], kw["spec"], kw["status"], elapsed)
        if waiting is None:
            return
        if waiting != told:  # what the deletion waits for, once, for kubectl describe
            await Reconciler(name, namespace).event(kw["body"], "Normal", "Deleting", waiting)
            told = waiting
        if time.monotonic() - t0 > DELETE_PATIENCE_S:
            raise kopf.TemporaryError(f"{waiting} after {elapsed:.0f} s", delay=1)
        await asyncio.sleep(1.0)


# volume uid -> the DataNotRemoved messages posted for its deletion: the finalizer passes
# every second, and each cause is told once (forgotten when the finalizer is done)
_data_not_removed: dict[str, set[str]] = {}


async def _tell_data_not_removed(rec: Reconciler, body: Mapping[str, Any], uid: str, message: str) -> None:
    told = _data_not_removed.setdefault(uid, set())
    if message not in told:
        told.add(message)
        await rec.event(body, "Warning", "DataNotRemoved", message)


async def _finalize(
    name: str,
    namespace: str,
    body: Mapping[str, Any],
    spec: Mapping[str, Any],
    status: Mapping[str, Any],
    elapsed: float,
) -> str | None:
    """One pass of the finalizer; what it still waits for, or None when the volume is gone."""
    c = ctx()
    rec = Reconciler(name, namespace)
    rec.remember(body)
    uid = _uid(body)
    selector = f"{d.LABEL_VOLUME}={name},{m.APP_LABEL}={m.AGENT_APP}"
    pods = [pod_view(p) for p in await c.kube.list(pods_path(namespace), selector)]
    token = await rec._token()
    ready_nodes = {n.name for n in map(node_view, await c.kube.list(nodes_path())) if n.ready}
    for pod in pods:
        if pod.ip and token and not pod.deleting and pod.node in ready_nodes:
            try:
                await c.agents.stop(f"{pod.ip}:{d.API_PORT}", token)
            except AgentError as exc:
                log.info("%s/%s: stop %s: %s", namespace, name, pod.name, exc)
        # a pod on a dead node never confirms its termination: after a while, force it out
        # of the API (the volume is being deleted; its agent cannot hold the Lease anyway)
        force = pod.node not in ready_nodes and elapsed >= 10
        if force and pod.deleting:
            await rec.event(body, "Warning", "ForceDeleted", f"pod {pod.name} on unreachable node {pod.node}")
        await c.kube.delete(pods_path(namespace, pod.name), grace_s=0 if force else 1)
    if pods:
        return f"waiting for {len(pods)} agent pod(s) to terminate"
    # only the volume's own: another volume's (or a user's) object of a derived name stays
    for svc in (name, m.agents_service_name(name)):
        await delete_owned(c.kube, services_path(namespace, svc), uid)
    await c.kube.delete(lease_path(namespace, m.lease_name(name)))  # the agents', by name
    if c.config.per_volume_network_policy:
        # only then does the operator create it (and the chart grant it NetworkPolicies);
        # one left from a time the setting was on goes with the volume (ownerReference)
        await delete_owned(c.kube, netpol_path(namespace, m.network_policy_name(name)), uid)
    try:
        vspec = parse_spec(spec, name=name)
    except SpecError:
        vspec = None
    if vspec is not None and vspec.reclaim_policy == "Delete":
        nodes = set(VolumeStatus.from_dict(status).data_nodes)
        others = volume_dirs(f"{namespace}/{name}", await all_volumes(c), c) if nodes else []
        ready = {n.name for n in map(node_view, await c.kube.list(nodes_path())) if n.ready}
        wipes = [p for p in await c.kube.list(pods_path(namespace), f"pairvol.io/cleanup={name}")]
        done = {
            (p.get("spec") or {}).get("nodeName") for p in wipes if (p.get("status") or {}).get("phase") == "Succeeded"
        }
        pending: list[str] = []
        for node in sorted(nodes):
            if node not in ready:
                await _tell_data_not_removed(
                    rec,
                    body,
                    uid,
                    f"node {node} is not ready; data under {m.data_dir(vspec, namespace, name)} there was not removed",
                )
                continue
            if node in done:
                continue
            theirs = d.wipe_would_remove(m.data_dir(vspec, namespace, name), node, others)
            if theirs is not None:
                await _tell_data_not_removed(
                    rec,
                    body,
                    uid,
                    f"data under {m.data_dir(vspec, namespace, name)} on node {node} was not removed: it holds "
                    f"{theirs.path}, the data directory of ReplicatedVolume {theirs.key}, which may hold data on "
                    f"that node; remove this volume's files there by hand, leaving {theirs.path} alone",
                )
                continue
            pending.append(node)
            # none started later: every wipe is one of ``wipes``, deleted below before the volume
            # goes (one left running could remove a new volume's replica of the same name)
            if elapsed < 60:
                await c.kube.create_if_missing(
                    pods_path(namespace),
                    m.cleanup_pod_manifest(
                        volume=name, namespace=namespace, node=node, spec=vspec, owner=body, config=c.config
                    ),
                )
        if pending and elapsed < 60:
            return "waiting for data cleanup pods"
        for node in pending:
            where = f"data under {m.data_dir(vspec, namespace, name)} on node {node} was not removed"
            await _tell_data_not_removed(
                rec,
                body,
                uid,
                f"the cleanup pod {m.cleanup_pod_name(name, node)} did not succeed within 60 s; {where}",
            )
        # the volume goes only once its wipes are gone: one still running (``rm`` as PID 1
        # ignores SIGTERM) could remove a new volume's replica of the same name. A second's
        # grace, then the kubelet kills it; one whose kubelet does not confirm that (a node
        # not ready, or after half a minute more) is forced out of the API.
        for p in wipes:
            on = (p.get("spec") or {}).get("nodeName")
            force = on not in ready or elapsed >= 90
            await c.kube.delete(pods_path(namespace, (p.get("metadata") or {})["name"]), grace_s=0 if force else 1)
        if await c.kube.list(pods_path(namespace), f"pairvol.io/cleanup={name}"):
            return "waiting for the data cleanup pods to stop"
    for secret in (m.secret_name(name), m.export_secret_name(name)):
        await delete_owned(c.kube, secrets_path(namespace, secret), uid)
    c.metrics.set_phase(f"{namespace}/{name}", None)
    c.metrics.set_checkpoint(namespace, name, None)
    c.metrics.set_checkpoint_interval(namespace, name, None)
    _data_not_removed.pop(uid, None)
    log.info("%s/%s deleted (reclaimPolicy %s)", namespace, name, vspec.reclaim_policy if vspec else "?")
    return None


__all__ = ["Reconciler", "on_delete", "volume_daemon"]
