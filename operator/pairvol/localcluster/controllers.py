"""The local cluster's kube-controller-manager and scheduler: workloads become pods.

Why: the chart's operator is a Deployment, ``examples/workload.yaml`` is a Job, and users
try DaemonSets and StatefulSets; without controllers those objects are stored and nothing
happens. This module plays the parts of kube-controller-manager and kube-scheduler that
give them their documented meaning, against the emulated API server's object store:

* **scheduler** — a pod without ``spec.nodeName`` is bound to a Ready node whose labels
  match ``nodeSelector`` and required node affinity, whose NoSchedule/NoExecute taints it
  tolerates and which its required pod anti-affinity allows; among those, the one
  violating the fewest preferred anti-affinity weights, then running the fewest pods
  (pod affinity and topology spread constraints are not considered); otherwise it stays Pending with
  ``PodScheduled=False``/``Unschedulable`` and a ``FailedScheduling`` Event saying why.
  Its PersistentVolumeClaims, as the volume binding plugin sees them: a missing claim, or
  an unbound one of an ``Immediate`` StorageClass, keeps the pod Pending; for unbound
  claims of a ``WaitForFirstConsumer`` class the scheduler chooses the node, writes it on
  the claims (annotation ``volume.kubernetes.io/selected-node``, which the provisioner waits
  for) and binds the pod to that node once they are all bound (PV node affinity is not
  considered: the local cluster's volumes have none);
* **Deployment → ReplicaSet** — one ReplicaSet per pod template (named by the template's
  hash, label ``pod-template-hash``), ``Recreate`` or ``RollingUpdate`` with
  ``maxSurge``/``maxUnavailable`` (the upstream arithmetic), revision annotations,
  ``revisionHistoryLimit``, and the status ``kubectl rollout status`` reads
  (observedGeneration, replicas/updated/ready/available, Available/Progressing);
* **ReplicaSet → Pods** — keeps ``replicas`` active pods, deleting the least useful first
  (unscheduled, then not ready, then the newest);
* **Job** — ``parallelism``/``completions``, ``backoffLimit`` (for ``OnFailure`` the
  container restarts count, as upstream), back-off between new pods after failures,
  ``activeDeadlineSeconds``, conditions Complete/Failed, ``ttlSecondsAfterFinished``;
* **DaemonSet** — one pod per eligible node (bound directly, with the DaemonSet default
  tolerations), rolling update one node at a time;
* **StatefulSet** — pods ``<name>-0..N-1`` with stable names, created in order and each
  only when its predecessors are Running and Ready (``OrderedReady``) or all at once
  (``Parallel``), removed from the highest ordinal, rolling update from the highest.

Every object a controller creates carries a controller ``ownerReference``, so the API
server's garbage collector (background and ``Orphan`` propagation, in
:mod:`apiserver_store`) removes pods with their ReplicaSet, Job, DaemonSet or StatefulSet
and ReplicaSets with their Deployment.

How: level-triggered, like the real controllers. The manager subscribes to changes of
pods, nodes and the workload kinds in the store; after a change (or every ``resync``
seconds, for time-based rules) it runs one synchronous pass over everything, which
computes each object's wanted state from what is stored and writes only differences. A
pass has no ``await`` inside, so it sees one consistent snapshot and no API request
interleaves with it. Objects are small and few here; the whole-world pass keeps every
rule stateless and restart-safe.

Not emulated: pod eviction from dead nodes (the node simulator documents why: the
operator decides), foreground deletion, adoption of orphan pods, Indexed Jobs,
ControllerRevision objects (``kubectl rollout undo`` of a DaemonSet/StatefulSet),
``minReadySeconds`` for DaemonSets/StatefulSets, volumeClaimTemplates (no PVCs).
Deviation: a Job's back-off after a failed pod starts at ``job_backoff_base`` (1 s, not
upstream's 10 s) so local runs stay short.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import datetime
import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping
from types import TracebackType
from typing import Any

from pairvol.aio import bounded
from pairvol.localcluster.apiserver_builtin import ResourceType
from pairvol.localcluster.apiserver_logic import RequestError, now_rfc3339
from pairvol.localcluster.apiserver_store import ObjectStore, WatchEntry

logger = logging.getLogger(__name__)

JsonDict = dict[str, Any]

# What the manager reacts to: (group, version, plural).
WATCHED = (
    ("", "v1", "pods"),
    ("", "v1", "nodes"),
    ("apps", "v1", "deployments"),
    ("apps", "v1", "replicasets"),
    ("apps", "v1", "daemonsets"),
    ("apps", "v1", "statefulsets"),
    ("batch", "v1", "jobs"),
    ("", "v1", "persistentvolumeclaims"),  # a bound claim lets its pod be scheduled
)

SELECTED_NODE = "volume.kubernetes.io/selected-node"
WAIT_FOR_FIRST_CONSUMER = "WaitForFirstConsumer"

TEMPLATE_HASH = "pod-template-hash"
REVISION = "deployment.kubernetes.io/revision"
REVISION_HASH = "controller-revision-hash"
JOB_UID = "batch.kubernetes.io/controller-uid"
JOB_NAME = "batch.kubernetes.io/job-name"
# Tolerations the DaemonSet controller adds to its pods (upstream's list, NoExecute/NoSchedule).
DAEMON_TOLERATIONS = (
    {"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute"},
    {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute"},
    {"key": "node.kubernetes.io/disk-pressure", "operator": "Exists", "effect": "NoSchedule"},
    {"key": "node.kubernetes.io/memory-pressure", "operator": "Exists", "effect": "NoSchedule"},
    {"key": "node.kubernetes.io/pid-pressure", "operator": "Exists", "effect": "NoSchedule"},
    {"key": "node.kubernetes.io/unschedulable", "operator": "Exists", "effect": "NoSchedule"},
)
_HASH_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"  # upstream's SafeEncodeString alphabet


# ----------------------------------------------------------------------------- pure helpers


def _normalized(value: Any) -> Any:
    """``value`` without nulls, empty maps and empty lists (as typed clients see it: a
    template that went through ``kubectl rollout undo`` gains ``resources: {}`` and
    ``creationTimestamp: null`` yet is the same template)."""
    if isinstance(value, dict):
        items = ((k, _normalized(v)) for k, v in value.items())
        return {k: v for k, v in items if v not in (None, {}, [])}
    if isinstance(value, list):
        return [_normalized(v) for v in value]
    return value


def template_hash(template: Any) -> str:
    """A short stable name for a pod template (same template, same hash)."""
    digest = hashlib.sha256(json.dumps(_normalized(template), sort_keys=True).encode()).digest()
    return "".join(_HASH_ALPHABET[b % len(_HASH_ALPHABET)] for b in digest[:10])


def parse_time(text: str | None) -> float | None:
    """Seconds since the epoch of an RFC 3339 timestamp, or None."""
    if not text:
        return None
    try:
        return datetime.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def meta(obj: JsonDict) -> JsonDict:
    result: JsonDict = obj.setdefault("metadata", {})
    return result


def spec(obj: JsonDict) -> JsonDict:
    result = obj.get("spec")
    return result if isinstance(result, dict) else {}


def status(obj: JsonDict) -> JsonDict:
    result = obj.get("status")
    return result if isinstance(result, dict) else {}


def controller_uid(obj: JsonDict) -> str | None:
    for ref in meta(obj).get("ownerReferences") or []:
        if ref.get("controller"):
            return str(ref.get("uid"))
    return None


def owner_reference(owner: JsonDict) -> JsonDict:
    return {
        "apiVersion": owner["apiVersion"],
        "kind": owner["kind"],
        "name": meta(owner)["name"],
        "uid": meta(owner)["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def is_terminating(obj: JsonDict) -> bool:
    return bool(meta(obj).get("deletionTimestamp"))


def pod_phase(pod: JsonDict) -> str:
    return str(status(pod).get("phase") or "Pending")


def is_active(pod: JsonDict) -> bool:
    """Counts toward a controller's replicas: not finished and not being deleted."""
    return pod_phase(pod) not in ("Succeeded", "Failed") and not is_terminating(pod)


def _condition(obj: JsonDict, ctype: str) -> JsonDict | None:
    return next((c for c in status(obj).get("conditions") or [] if c.get("type") == ctype), None)


def is_ready(pod: JsonDict) -> bool:
    cond = _condition(pod, "Ready")
    return cond is not None and cond.get("status") == "True"


def is_available(pod: JsonDict, min_ready_seconds: int, now: float) -> bool:
    """Ready for at least ``min_ready_seconds`` (upstream's availability)."""
    if not is_ready(pod) or is_terminating(pod):
        return False
    if min_ready_seconds <= 0:
        return True
    since = parse_time((_condition(pod, "Ready") or {}).get("lastTransitionTime"))
    return since is not None and now - since >= min_ready_seconds


def node_ready(node: JsonDict) -> bool:
    cond = _condition(node, "Ready")
    return cond is not None and cond.get("status") == "True"


def resolve_int_or_percent(value: Any, total: int, *, round_up: bool, default: str) -> int:
    """``maxSurge``/``maxUnavailable``: an int, or a percentage of ``total``."""
    if value is None:
        value = default
    if isinstance(value, str) and value.endswith("%"):
        try:
            fraction = float(value[:-1]) * total / 100
        except ValueError:
            return 0
        return math.ceil(fraction) if round_up else math.floor(fraction)
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


def _expression_matches(expr: JsonDict, value: str | None) -> bool:
    op, values = expr.get("operator"), [str(v) for v in expr.get("values") or []]
    if op == "In":
        return value is not None and value in values
    if op == "NotIn":
        return value is None or value not in values
    if op == "Exists":
        return value is not None
    if op == "DoesNotExist":
        return value is None
    if op in ("Gt", "Lt") and value is not None and values:
        try:
            a, b = int(value), int(values[0])
        except ValueError:
            return False
        return a > b if op == "Gt" else a < b
    return False


def node_fits(pod_spec: JsonDict, node: JsonDict) -> str | None:
    """Why ``node`` cannot take a pod with ``pod_spec`` (labels only), or None if it can."""
    labels = meta(node).get("labels") or {}
    for key, value in (pod_spec.get("nodeSelector") or {}).items():
        if labels.get(key) != value:
            return "didn't match Pod's node affinity/selector"
    required = ((pod_spec.get("affinity") or {}).get("nodeAffinity") or {}).get(
        "requiredDuringSchedulingIgnoredDuringExecution"
    ) or {}
    terms = required.get("nodeSelectorTerms") or []
    if terms:

        def term_matches(term: JsonDict) -> bool:
            fields = {"metadata.name": meta(node)["name"]}
            return all(
                _expression_matches(e, labels.get(e.get("key"))) for e in term.get("matchExpressions") or []
            ) and all(_expression_matches(e, fields.get(e.get("key", ""))) for e in term.get("matchFields") or [])

        if not any(term_matches(t) for t in terms):
            return "didn't match Pod's node affinity/selector"
    return None


def tolerates(tolerations: Iterable[JsonDict], taint: JsonDict) -> bool:
    for tol in tolerations:
        if tol.get("effect") and tol.get("effect") != taint.get("effect"):
            continue
        if tol.get("operator") == "Exists":
            if not tol.get("key") or tol.get("key") == taint.get("key"):
                return True
        elif tol.get("key") == taint.get("key") and (tol.get("value") or "") == (taint.get("value") or ""):
            return True
    return False


def untolerated_taint(tolerations: Iterable[JsonDict], node: JsonDict) -> JsonDict | None:
    tols = list(tolerations)
    for taint in spec(node).get("taints") or []:
        if taint.get("effect") in ("NoSchedule", "NoExecute") and not tolerates(tols, taint):
            return dict(taint)
    return None


def label_selector_matches(selector: JsonDict | None, labels: JsonDict) -> bool:
    """A LabelSelector (matchLabels + matchExpressions); a missing one matches nothing."""
    if selector is None:
        return False
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    return all(_expression_matches(e, labels.get(e.get("key"))) for e in selector.get("matchExpressions") or [])


def anti_affinity(
    pod: JsonDict, labels: JsonDict, node_labels: dict[str, JsonDict], placed: list[tuple[str, JsonDict]]
) -> tuple[bool, int]:
    """For a node with ``labels``: does the pod's required podAntiAffinity forbid it, and the
    summed weight of its preferred terms it would violate (pods already ``placed``)."""
    terms = (spec(pod).get("affinity") or {}).get("podAntiAffinity") or {}
    namespace = meta(pod).get("namespace")

    def hits(term: JsonDict) -> bool:
        key = term.get("topologyKey") or ""
        domain = labels.get(key)
        if domain is None:
            return False
        namespaces = term.get("namespaces") or [namespace]
        return any(
            other is not pod
            and node_labels.get(node, {}).get(key) == domain
            and meta(other).get("namespace") in namespaces
            and label_selector_matches(term.get("labelSelector"), meta(other).get("labels") or {})
            for node, other in placed
        )

    required = any(hits(t) for t in terms.get("requiredDuringSchedulingIgnoredDuringExecution") or [])
    penalty = sum(
        int(w.get("weight", 1))
        for w in terms.get("preferredDuringSchedulingIgnoredDuringExecution") or []
        if hits(w.get("podAffinityTerm") or {})
    )
    return required, penalty


def volume_binding(
    pod: JsonDict, claims: Mapping[str, JsonDict], classes: Mapping[str, JsonDict]
) -> tuple[str | None, list[JsonDict], str | None]:
    """What the scheduler's volume binding says of a pod (pure), given the claims of its
    namespace by name and the StorageClasses by name: (why it cannot be scheduled now or
    None; its unbound WaitForFirstConsumer claims, which wait for the node to be chosen; the
    node its claims name as selected already, if any)."""
    delayed: list[JsonDict] = []
    selected: str | None = None
    for volume in spec(pod).get("volumes") or []:
        name = (volume.get("persistentVolumeClaim") or {}).get("claimName")
        if not name:
            continue
        claim = claims.get(name)
        if claim is None:
            return f'persistentvolumeclaim "{name}" not found', [], None
        if is_terminating(claim):
            return f'persistentvolumeclaim "{name}" is being deleted', [], None
        selected = selected or (meta(claim).get("annotations") or {}).get(SELECTED_NODE)
        if status(claim).get("phase") == "Bound":
            continue
        storage_class = classes.get(str(spec(claim).get("storageClassName") or ""))
        if storage_class is not None and storage_class.get("volumeBindingMode") == WAIT_FOR_FIRST_CONSUMER:
            delayed.append(claim)
            continue
        return "pod has unbound immediate PersistentVolumeClaims", [], None
    return None, delayed, selected


def _deletion_rank(pod: JsonDict) -> tuple[int, int, int, float]:
    """Sort key: the pod a controller should remove first comes first (upstream's order)."""
    phase_rank = {"Pending": 0, "Unknown": 1, "Running": 2}.get(pod_phase(pod), 0)
    created = parse_time(meta(pod).get("creationTimestamp")) or 0.0
    return (1 if spec(pod).get("nodeName") else 0, phase_rank, 1 if is_ready(pod) else 0, -created)


def set_condition(
    conditions: list[JsonDict],
    ctype: str,
    state: str,
    reason: str,
    message: str,
    now: str,
    *,
    update_time: bool = False,
) -> list[JsonDict]:
    """``conditions`` with ``ctype`` set; lastTransitionTime moves only when the status does."""
    old = next((c for c in conditions if c.get("type") == ctype), None)
    cond: JsonDict = {"type": ctype, "status": state, "reason": reason, "message": message}
    if update_time:
        same = old is not None and all(old.get(k) == cond[k] for k in ("status", "reason", "message"))
        cond["lastUpdateTime"] = old.get("lastUpdateTime", now) if same and old is not None else now
    same_status = old is not None and old.get("status") == state
    cond["lastTransitionTime"] = old.get("lastTransitionTime", now) if same_status and old is not None else now
    return [c for c in conditions if c.get("type") != ctype] + [cond]


_OWNER_KINDS = frozenset({"ReplicaSet", "Job", "DaemonSet", "StatefulSet"})


def _node_facts(node: JsonDict | None) -> tuple[Any, ...] | None:
    if node is None:
        return None
    return (meta(node).get("labels"), spec(node).get("taints"), spec(node).get("unschedulable"), node_ready(node))


def _relevant(entry: WatchEntry) -> bool:
    """Whether a change may matter to a controller now (else the periodic pass sees it)."""
    _, _, obj, old = entry
    kind = obj.get("kind")
    if kind == "Node":
        return _node_facts(obj) != _node_facts(old)
    if kind == "Pod":
        refs = meta(obj).get("ownerReferences") or []
        owned = any(r.get("controller") and r.get("kind") in _OWNER_KINDS for r in refs)
        return owned or not spec(obj).get("nodeName")
    return True


# ----------------------------------------------------------------------------- the manager


class ControllerManager:
    """Scheduler and workload controllers on one store; ``async with ControllerManager(api)``."""

    def __init__(self, api: ObjectStore, *, resync: float = 1.0, job_backoff_base: float = 1.0) -> None:
        self.api = api
        self.resync = resync
        self.job_backoff_base = job_backoff_base
        self._queue: asyncio.Queue[WatchEntry | None] = asyncio.Queue()
        self._watches: list[tuple[str, str, Any]] = []
        self._task: asyncio.Task[None] | None = None
        # Job uid -> (failures seen, monotonic time the count last grew): the back-off clock.
        self._job_failures: dict[str, tuple[int, float]] = {}
        self._now = time.time()
        self._now_text = now_rfc3339()

    async def __aenter__(self) -> ControllerManager:
        for group, _, plural in WATCHED:
            self._watches.append((group, plural, self.api.subscribe(group, plural, self._queue)))
        self._task = asyncio.create_task(self._run(), name="localcluster-controllers")
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for group, plural, watch in self._watches:
            self.api.unsubscribe(group, plural, watch)
        self._watches.clear()

    async def _run(self) -> None:
        while True:
            deadline = time.monotonic() + self.resync
            relevant = False
            while not relevant:  # changes no controller looks at (heartbeats, others' pods) wait
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    entry = await bounded(self._queue.get(), timeout=left)
                except TimeoutError:
                    break
                relevant = entry is not None and _relevant(entry)
            if relevant:
                await asyncio.sleep(0.05)  # let a burst of changes land, then one pass
            while not self._queue.empty():
                self._queue.get_nowait()
            try:
                self.reconcile()
            except Exception as exc:  # a bug in one pass must not stop the cluster
                logger.warning("controllers: reconcile pass failed: %s", exc)
                logger.debug("controllers: reconcile pass failed", exc_info=True)

    # ------------------------------------------------------------------ store access

    def _type(self, group: str, plural: str) -> ResourceType:
        return self.api.resource_type(group, "v1", plural)

    def _list(self, group: str, plural: str) -> list[JsonDict]:
        return self.api.list_objects(self._type(group, plural), None)

    def _create(self, group: str, plural: str, body: JsonDict) -> JsonDict | None:
        try:
            created = self.api.create_object(group, "v1", plural, body, meta(body).get("namespace"))
            return copy.deepcopy(created)  # the store's own dict: never mutate it
        except RequestError as exc:  # e.g. a name still taken, a namespace going away: next pass
            logger.info("controllers: cannot create %s %s: %s", plural, meta(body).get("name"), exc.message)
            return None

    def _update(self, group: str, plural: str, obj: JsonDict, subresource: str | None = None) -> None:
        body = copy.deepcopy(obj)
        meta(body).pop("resourceVersion", None)  # a pass is atomic: last write wins
        try:
            self.api.update_object(
                self._type(group, plural), meta(obj).get("namespace", ""), meta(obj)["name"], body, subresource,
                require_rv=False,
            )  # fmt: skip
        except RequestError as exc:
            logger.info("controllers: cannot update %s %s: %s", plural, meta(obj)["name"], exc.message)

    def _write_status(self, group: str, plural: str, obj: JsonDict, new_status: JsonDict) -> None:
        if status(obj) != new_status:
            self._update(group, plural, {**obj, "status": new_status}, "status")

    def _delete(self, group: str, plural: str, obj: JsonDict) -> None:
        try:
            self.api.delete_object(self._type(group, plural), meta(obj).get("namespace", ""), meta(obj)["name"])
        except RequestError as exc:
            logger.info("controllers: cannot delete %s %s: %s", plural, meta(obj)["name"], exc.message)

    def _event(self, obj: JsonDict, reason: str, message: str, component: str, etype: str = "Normal") -> None:
        m = meta(obj)
        body = {
            "metadata": {"generateName": f"{m['name']}.", "namespace": m.get("namespace") or "default"},
            "involvedObject": {
                "apiVersion": obj.get("apiVersion"),
                "kind": obj.get("kind"),
                "name": m["name"],
                "namespace": m.get("namespace"),
                "uid": m.get("uid"),
            },
            "reason": reason,
            "message": message,
            "type": etype,
            "source": {"component": component},
            "reportingComponent": component,
            "firstTimestamp": self._now_text,
            "lastTimestamp": self._now_text,
            "count": 1,
        }
        self._create("", "events", body)

    def _new_pod(
        self, owner: JsonDict, template: JsonDict, *, name: str | None = None, labels: JsonDict | None = None
    ) -> JsonDict:
        tmeta = template.get("metadata") or {}
        pod_meta: JsonDict = {
            "namespace": meta(owner)["namespace"],
            "labels": {**(tmeta.get("labels") or {}), **(labels or {})},
            "ownerReferences": [owner_reference(owner)],
        }
        if tmeta.get("annotations"):
            pod_meta["annotations"] = dict(tmeta["annotations"])
        if name:
            pod_meta["name"] = name
        else:
            pod_meta["generateName"] = f"{meta(owner)['name']}-"
        return {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": pod_meta,
            "spec": copy.deepcopy(template.get("spec") or {}),
        }

    # ------------------------------------------------------------------ one pass

    def reconcile(self) -> None:
        """One level-triggered pass of every controller (synchronous: one snapshot)."""
        self._now, self._now_text = time.time(), now_rfc3339()
        pods = self._list("", "pods")
        by_owner: dict[str, list[JsonDict]] = {}
        for pod in pods:
            uid = controller_uid(pod)
            if uid:
                by_owner.setdefault(uid, []).append(pod)
        nodes = self._list("", "nodes")
        steps: list[tuple[str, str, Callable[[JsonDict], None]]] = [
            ("apps", "replicasets", lambda o: self._sync_replicaset(o, by_owner.get(meta(o)["uid"], []))),
            ("apps", "deployments", self._sync_deployment),
            ("batch", "jobs", lambda o: self._sync_job(o, by_owner.get(meta(o)["uid"], []))),
            ("apps", "daemonsets", lambda o: self._sync_daemonset(o, by_owner.get(meta(o)["uid"], []), nodes)),
            ("apps", "statefulsets", lambda o: self._sync_statefulset(o, by_owner.get(meta(o)["uid"], []))),
        ]
        for group, plural, sync in steps:
            for obj in self._list(group, plural):
                if is_terminating(obj):
                    continue
                try:
                    sync(obj)
                except (KeyError, TypeError, ValueError, AttributeError) as exc:
                    logger.warning(
                        "controllers: %s %s/%s: %s", plural, meta(obj).get("namespace"), meta(obj).get("name"), exc
                    )
                    logger.debug("controllers: %s failed", plural, exc_info=True)
        live = {meta(j)["uid"] for j in self._list("batch", "jobs")}
        for uid in [u for u in self._job_failures if u not in live]:
            del self._job_failures[uid]
        self._schedule(self._list("", "pods"), nodes)

    # ------------------------------------------------------------------ scheduler

    def _schedule(self, pods: list[JsonDict], nodes: list[JsonDict]) -> None:
        load: dict[str, int] = {}
        for pod in pods:
            node = spec(pod).get("nodeName")
            if node and is_active(pod):
                load[node] = load.get(node, 0) + 1
        node_labels = {meta(n)["name"]: meta(n).get("labels") or {} for n in nodes}
        placed = [(str(spec(p)["nodeName"]), p) for p in pods if spec(p).get("nodeName") and is_active(p)]
        claims: dict[str, dict[str, JsonDict]] = {}
        for claim in self._list("", "persistentvolumeclaims"):
            claims.setdefault(str(meta(claim).get("namespace")), {})[meta(claim)["name"]] = claim
        classes = {meta(c)["name"]: c for c in self._list("storage.k8s.io", "storageclasses")}
        for pod in pods:
            pspec = spec(pod)
            if pspec.get("nodeName") or not is_active(pod):
                continue
            if pspec.get("schedulerName") not in (None, "", "default-scheduler"):
                continue
            why_not, delayed, selected = volume_binding(pod, claims.get(meta(pod).get("namespace", ""), {}), classes)
            if why_not is not None:
                self._unschedulable(pod, f"0/{len(nodes)} nodes are available: {why_not}.")
                continue
            if delayed and selected:
                continue  # the claims are being provisioned for the node chosen: bound after them
            reasons: dict[str, int] = {}
            fits: dict[str, int] = {}  # node -> anti-affinity penalty (preferred terms' weights)
            for node in nodes:
                why = self._unfit(pspec, node)
                penalty = 0
                if why is None:
                    violated, penalty = anti_affinity(pod, node_labels[meta(node)["name"]], node_labels, placed)
                    why = "didn't match pod anti-affinity rules" if violated else None
                if why is None:
                    fits[meta(node)["name"]] = penalty
                else:
                    reasons[why] = reasons.get(why, 0) + 1
            if fits:
                # the node the pod's claims were provisioned for, if it still fits
                chosen = selected if selected in fits else min(fits, key=lambda n: (fits[n], load.get(n, 0), n))
                load[chosen] = load.get(chosen, 0) + 1
                if delayed:  # the provisioners wait for this; the pod is bound once they are
                    for claim in delayed:
                        annotated = copy.deepcopy(claim)
                        meta(annotated).setdefault("annotations", {})[SELECTED_NODE] = chosen
                        self._update("", "persistentvolumeclaims", annotated)
                    continue
                placed.append((chosen, pod))
                bound = copy.deepcopy(pod)
                bound["spec"]["nodeName"] = chosen
                self._update("", "pods", bound)
                conds = set_condition(
                    status(pod).get("conditions") or [], "PodScheduled", "True", "", "", self._now_text
                )
                self._write_status("", "pods", bound, {**status(pod), "conditions": conds})
                name = f"{meta(pod)['namespace']}/{meta(pod)['name']}"
                self._event(pod, "Scheduled", f"Successfully assigned {name} to {chosen}", "default-scheduler")
                continue
            detail = ", ".join(f"{count} node(s) {why}" for why, count in sorted(reasons.items()))
            self._unschedulable(pod, f"0/{len(nodes)} nodes are available" + (f": {detail}." if detail else "."))

    def _unschedulable(self, pod: JsonDict, message: str) -> None:
        old = _condition(pod, "PodScheduled")
        if old is None or old.get("message") != message:
            conds = set_condition(
                status(pod).get("conditions") or [],
                "PodScheduled",
                "False",
                "Unschedulable",
                message,
                self._now_text,
            )
            self._write_status("", "pods", pod, {**status(pod), "conditions": conds})
            self._event(pod, "FailedScheduling", message, "default-scheduler", "Warning")

    @staticmethod
    def _unfit(pod_spec: JsonDict, node: JsonDict) -> str | None:
        if not node_ready(node):
            return "were not Ready"
        if spec(node).get("unschedulable"):
            return "were unschedulable"
        why = node_fits(pod_spec, node)
        if why is not None:
            return why
        taint = untolerated_taint(pod_spec.get("tolerations") or [], node)
        if taint is not None:
            return f"had untolerated taint {{{taint.get('key')}: {taint.get('value') or ''}}}"
        return None

    # ------------------------------------------------------------------ ReplicaSet

    def _sync_replicaset(self, rs: JsonDict, owned: list[JsonDict]) -> None:
        want = int(spec(rs).get("replicas", 1))
        active = [p for p in owned if is_active(p)]
        template = spec(rs).get("template") or {}
        if len(active) < want:
            for _ in range(want - len(active)):
                self._create("", "pods", self._new_pod(rs, template))
        elif len(active) > want:
            for pod in sorted(active, key=_deletion_rank)[: len(active) - want]:
                self._delete("", "pods", pod)
        min_ready = int(spec(rs).get("minReadySeconds") or 0)
        labels = (template.get("metadata") or {}).get("labels") or {}
        new_status = {
            "replicas": len(active),
            "fullyLabeledReplicas": sum(
                1 for p in active if all((meta(p).get("labels") or {}).get(k) == v for k, v in labels.items())
            ),
            "readyReplicas": sum(1 for p in active if is_ready(p)),
            "availableReplicas": sum(1 for p in active if is_available(p, min_ready, self._now)),
            "observedGeneration": meta(rs).get("generation", 1),
        }
        self._write_status("apps", "replicasets", rs, new_status)

    # ------------------------------------------------------------------ Deployment

    def _sync_deployment(self, deploy: JsonDict) -> None:
        dspec = spec(deploy)
        replicas = int(dspec.get("replicas", 1))
        template = dspec.get("template") or {}
        thash = template_hash(template)
        uid = meta(deploy)["uid"]
        owned = [rs for rs in self._list("apps", "replicasets") if controller_uid(rs) == uid]
        new = next((rs for rs in owned if (meta(rs).get("labels") or {}).get(TEMPLATE_HASH) == thash), None)
        olds = sorted(
            (rs for rs in owned if rs is not new),
            key=lambda rs: int((meta(rs).get("annotations") or {}).get(REVISION, "0")),
        )
        revisions = [int((meta(rs).get("annotations") or {}).get(REVISION, "0")) for rs in owned]
        top = max(revisions, default=0)
        strategy = dspec.get("strategy") or {}
        rolling = strategy.get("type", "RollingUpdate") != "Recreate"
        surge = resolve_int_or_percent(
            (strategy.get("rollingUpdate") or {}).get("maxSurge"), replicas, round_up=True, default="25%"
        )
        unavailable = resolve_int_or_percent(
            (strategy.get("rollingUpdate") or {}).get("maxUnavailable"), replicas, round_up=False, default="25%"
        )
        if rolling and surge == 0 and unavailable == 0:
            unavailable = 1
        if not rolling:
            surge, unavailable = 0, replicas
        paused = bool(dspec.get("paused"))

        if new is None and not paused:
            new = self._new_replicaset(deploy, template, thash, top + 1, olds, replicas, surge, rolling)
            if new is None:
                return
        elif new is not None and not paused:
            rev = int((meta(new).get("annotations") or {}).get(REVISION, "0"))
            if rev < top or rev == 0:  # a rollback to an older template becomes the newest revision
                meta(new).setdefault("annotations", {})[REVISION] = str(top + 1)
                self._update("apps", "replicasets", new)

        if not paused and new is not None:
            revision = (meta(new).get("annotations") or {}).get(REVISION)
            if revision and (meta(deploy).get("annotations") or {}).get(REVISION) != revision:
                marked = copy.deepcopy(deploy)  # the revision shown by `kubectl rollout history`
                meta(marked).setdefault("annotations", {})[REVISION] = revision
                self._update("apps", "deployments", marked)
            self._roll(new, olds, replicas, surge, unavailable, rolling)
            self._cleanup_history(dspec, olds)
        self._deployment_status(deploy, new, olds, replicas, unavailable)

    def _new_replicaset(
        self,
        deploy: JsonDict,
        template: JsonDict,
        thash: str,
        revision: int,
        olds: list[JsonDict],
        replicas: int,
        surge: int,
        rolling: bool,
    ) -> JsonDict | None:
        name = f"{meta(deploy)['name']}-{thash}"
        tmpl = copy.deepcopy(template)
        tmeta = tmpl.setdefault("metadata", {})
        tmeta["labels"] = {**(tmeta.get("labels") or {}), TEMPLATE_HASH: thash}
        selector = copy.deepcopy(spec(deploy).get("selector") or {})
        selector["matchLabels"] = {**(selector.get("matchLabels") or {}), TEMPLATE_HASH: thash}
        old_total = sum(int(spec(rs).get("replicas", 0)) for rs in olds)
        if not old_total:
            start = replicas
        elif rolling:
            start = max(0, min(replicas, replicas + surge - old_total))
        else:
            start = 0
        body: JsonDict = {
            "apiVersion": "apps/v1",
            "kind": "ReplicaSet",
            "metadata": {
                "name": name,
                "namespace": meta(deploy)["namespace"],
                "labels": {**(tmeta.get("labels") or {})},
                "annotations": {REVISION: str(revision), "deployment.kubernetes.io/desired-replicas": str(replicas)},
                "ownerReferences": [owner_reference(deploy)],
            },
            "spec": {
                "replicas": start,
                "minReadySeconds": int(spec(deploy).get("minReadySeconds") or 0),
                "selector": selector,
                "template": tmpl,
            },
        }
        created = self._create("apps", "replicasets", body)
        if created is not None:
            self._event(
                deploy, "ScalingReplicaSet", f"Scaled up replica set {name} to {start}", "deployment-controller"
            )
        return created

    def _scale(self, rs: JsonDict, count: int) -> None:
        if int(spec(rs).get("replicas", 0)) == count:
            return
        before = int(spec(rs).get("replicas", 0))
        rs["spec"]["replicas"] = count
        self._update("apps", "replicasets", rs)
        verb = "up" if count > before else "down"
        logger.info(
            "controllers: scaled %s replica set %s/%s to %d", verb, meta(rs)["namespace"], meta(rs)["name"], count
        )

    def _roll(
        self, new: JsonDict, olds: list[JsonDict], replicas: int, surge: int, unavailable: int, rolling: bool
    ) -> None:
        """Upstream's rolling-update arithmetic (and Recreate: old to zero, then new)."""

        def count(rs: JsonDict) -> int:
            return int(spec(rs).get("replicas", 0))

        def available(rs: JsonDict) -> int:
            return int(status(rs).get("availableReplicas", 0))

        live_olds = [rs for rs in olds if count(rs) > 0 or int(status(rs).get("replicas", 0)) > 0]
        if not live_olds:
            self._scale(new, replicas)
            return
        if not rolling:
            for rs in olds:
                self._scale(rs, 0)
            if not any(int(status(rs).get("replicas", 0)) for rs in olds):
                self._scale(new, replicas)
            return
        # Scale up the new ReplicaSet within replicas + maxSurge.
        total = count(new) + sum(count(rs) for rs in olds)
        if count(new) > replicas:
            self._scale(new, replicas)
        elif count(new) < replicas and total < replicas + surge:
            self._scale(new, count(new) + min(replicas + surge - total, replicas - count(new)))
        # Scale down old ones, keeping replicas - maxUnavailable available.
        total = count(new) + sum(count(rs) for rs in olds)
        min_available = replicas - unavailable
        new_unavailable = max(0, count(new) - available(new))
        budget = total - min_available - new_unavailable
        if budget <= 0:
            return
        for rs in olds:  # first the pods that are not available anyway
            unhealthy = count(rs) - available(rs)
            if budget <= 0:
                break
            if unhealthy > 0:
                cut = min(budget, unhealthy)
                self._scale(rs, count(rs) - cut)
                budget -= cut
        available_now = available(new) + sum(min(available(rs), count(rs)) for rs in olds)
        spare = min(budget, available_now - min_available)
        for rs in olds:
            if spare <= 0:
                break
            cut = min(spare, count(rs))
            if cut > 0:
                self._scale(rs, count(rs) - cut)
                spare -= cut

    def _cleanup_history(self, dspec: JsonDict, olds: list[JsonDict]) -> None:
        limit = int(dspec.get("revisionHistoryLimit", 10))
        idle = [rs for rs in olds if not int(spec(rs).get("replicas", 0)) and not int(status(rs).get("replicas", 0))]
        for rs in idle[: max(0, len(idle) - limit)]:
            self._delete("apps", "replicasets", rs)

    def _deployment_status(
        self, deploy: JsonDict, new: JsonDict | None, olds: list[JsonDict], replicas: int, unavailable: int
    ) -> None:
        all_rs = ([new] if new is not None else []) + olds
        old_st = status(deploy)

        def total(key: str) -> int:
            return sum(int(status(rs).get(key, 0)) for rs in all_rs)

        current = total("replicas")
        updated = int(status(new).get("replicas", 0)) if new is not None else 0
        available = total("availableReplicas")
        counts: JsonDict = {
            "observedGeneration": meta(deploy).get("generation", 1),
            "replicas": current,
            "updatedReplicas": updated,
            "readyReplicas": total("readyReplicas"),
            "availableReplicas": available,
            "unavailableReplicas": max(0, replicas - available),
        }
        conds = list(old_st.get("conditions") or [])
        if available >= replicas - unavailable:
            conds = set_condition(
                conds, "Available", "True", "MinimumReplicasAvailable", "Deployment has minimum availability.",
                self._now_text, update_time=True,
            )  # fmt: skip
        else:
            conds = set_condition(
                conds, "Available", "False", "MinimumReplicasUnavailable",
                "Deployment does not have minimum availability.", self._now_text, update_time=True,
            )  # fmt: skip
        new_name = meta(new)["name"] if new is not None else ""
        complete = (
            new is not None
            and updated == replicas
            and current == replicas
            and available >= replicas
            and int(spec(new).get("replicas", 0)) == replicas
        )
        progress_changed = any(old_st.get(k) != v for k, v in counts.items() if k != "observedGeneration")
        previous = _condition(deploy, "Progressing")
        deadline = int(spec(deploy).get("progressDeadlineSeconds", 600))
        if spec(deploy).get("paused"):
            conds = set_condition(
                conds, "Progressing", "Unknown", "DeploymentPaused", "Deployment is paused", self._now_text,
                update_time=True,
            )  # fmt: skip
        elif complete:
            conds = set_condition(
                conds, "Progressing", "True", "NewReplicaSetAvailable",
                f'ReplicaSet "{new_name}" has successfully progressed.', self._now_text, update_time=True,
            )  # fmt: skip
        else:
            stalled_since = parse_time((previous or {}).get("lastUpdateTime"))
            stuck = (
                previous is not None
                and previous.get("reason") != "NewReplicaSetAvailable"
                and not progress_changed
                and stalled_since is not None
                and self._now - stalled_since > deadline
            )
            if stuck or ((previous or {}).get("reason") == "ProgressDeadlineExceeded" and not progress_changed):
                conds = set_condition(
                    conds, "Progressing", "False", "ProgressDeadlineExceeded",
                    f'ReplicaSet "{new_name}" has timed out progressing.', self._now_text, update_time=True,
                )  # fmt: skip
            else:
                conds = set_condition(
                    conds, "Progressing", "True", "ReplicaSetUpdated",
                    f'ReplicaSet "{new_name}" is progressing.', self._now_text,
                )  # fmt: skip
                if progress_changed or previous is None or previous.get("reason") != "ReplicaSetUpdated":
                    conds[-1]["lastUpdateTime"] = self._now_text
                else:
                    conds[-1]["lastUpdateTime"] = previous.get("lastUpdateTime", self._now_text)
        self._write_status("apps", "deployments", deploy, {**counts, "conditions": conds})

    # ------------------------------------------------------------------ Job

    def _sync_job(self, job: JsonDict, owned: list[JsonDict]) -> None:
        jspec = spec(job)
        m = meta(job)
        uid = m["uid"]
        template = jspec.get("template") or {}
        tlabels = (template.get("metadata") or {}).get("labels") or {}
        if not jspec.get("selector") or tlabels.get(JOB_UID) != uid:
            # What the real API server does when it admits a Job: a selector on its uid.
            fixed = copy.deepcopy(job)
            fixed["spec"].setdefault("selector", {"matchLabels": {JOB_UID: uid}})
            labels = fixed["spec"].setdefault("template", {}).setdefault("metadata", {}).setdefault("labels", {})
            labels.update({JOB_UID: uid, JOB_NAME: m["name"], "controller-uid": uid, "job-name": m["name"]})
            self._update("batch", "jobs", fixed)
            return  # the next pass sees the stored Job
        st = status(job)
        conds = list(st.get("conditions") or [])
        finished = any(c.get("type") in ("Complete", "Failed") and c.get("status") == "True" for c in conds)
        active = [p for p in owned if is_active(p)]
        succeeded = sum(1 for p in owned if pod_phase(p) == "Succeeded")
        failed = sum(1 for p in owned if pod_phase(p) == "Failed")
        policy = (template.get("spec") or {}).get("restartPolicy", "Never")
        restarts = 0
        if policy == "OnFailure":
            restarts = sum(
                int(c.get("restartCount", 0)) for p in active for c in status(p).get("containerStatuses") or []
            )
        parallelism = int(jspec.get("parallelism", 1))
        completions = jspec.get("completions")
        backoff_limit = int(jspec.get("backoffLimit", 6))
        new_st: JsonDict = {k: v for k, v in st.items() if k in ("startTime", "completionTime")}
        new_st.setdefault("startTime", self._now_text)

        if finished:
            if any(c.get("type") == "Failed" and c.get("status") == "True" for c in conds):
                for pod in active:
                    self._delete("", "pods", pod)
                active = []
            ttl = jspec.get("ttlSecondsAfterFinished")
            ended = max(
                (
                    parse_time(c.get("lastTransitionTime")) or 0.0
                    for c in conds
                    if c.get("type") in ("Complete", "Failed")
                ),
                default=0.0,
            )
            if ttl is not None and ended and self._now - ended >= int(ttl):
                self._delete("batch", "jobs", job)  # the TTL-after-finished controller; its pods follow (GC)
                return
        else:
            seen, since = self._job_failures.get(uid, (0, 0.0))
            if failed + restarts > seen:
                seen, since = failed + restarts, time.monotonic()
                self._job_failures[uid] = (seen, since)
            started = parse_time(new_st["startTime"]) or self._now
            deadline = jspec.get("activeDeadlineSeconds")
            failure: tuple[str, str] | None = None
            if failed + restarts > backoff_limit:
                failure = ("BackoffLimitExceeded", "Job has reached the specified backoff limit")
            elif deadline is not None and self._now - started >= int(deadline):
                failure = ("DeadlineExceeded", "Job was active longer than specified deadline")
            done = succeeded >= int(completions) if completions is not None else succeeded > 0 and not active
            if failure is not None:
                for pod in active:
                    self._delete("", "pods", pod)
                active = []
                conds = set_condition(conds, "FailureTarget", "True", failure[0], failure[1], self._now_text)
                conds = set_condition(conds, "Failed", "True", failure[0], failure[1], self._now_text)
                self._event(job, failure[0], failure[1], "job-controller", "Warning")
            elif done:
                conds = set_condition(
                    conds, "SuccessCriteriaMet", "True", "CompletionsReached",
                    "Reached expected number of succeeded pods", self._now_text,
                )  # fmt: skip
                conds = set_condition(
                    conds, "Complete", "True", "CompletionsReached", "Reached expected number of succeeded pods",
                    self._now_text,
                )  # fmt: skip
                new_st["completionTime"] = self._now_text
                self._event(job, "Completed", "Job completed", "job-controller")
            elif jspec.get("suspend"):
                for pod in active:
                    self._delete("", "pods", pod)
                active = []
            else:
                remaining = (int(completions) - succeeded) if completions is not None else parallelism
                want = max(0, min(parallelism, remaining) - len(active))
                wait = self.job_backoff_base * 2 ** (seen - 1) if seen else 0.0
                if want and time.monotonic() - since >= min(wait, 360.0):
                    for _ in range(want):
                        pod = self._new_pod(job, template)
                        if self._create("", "pods", pod) is not None:
                            active.append(pod)
        new_st.update(
            {
                "active": len(active),
                "ready": sum(1 for p in active if is_ready(p)),
                "succeeded": succeeded,
                "failed": failed,
            }
        )
        for key in ("active", "succeeded", "failed"):
            if not new_st[key]:
                del new_st[key]  # upstream omits zero counters
        if conds:
            new_st["conditions"] = conds
        self._write_status("batch", "jobs", job, new_st)

    # ------------------------------------------------------------------ DaemonSet

    def _sync_daemonset(self, ds: JsonDict, owned: list[JsonDict], nodes: list[JsonDict]) -> None:
        dspec = spec(ds)
        template = copy.deepcopy(dspec.get("template") or {})
        thash = template_hash(template)
        pod_spec = template.setdefault("spec", {})
        tolerations = list(pod_spec.get("tolerations") or [])
        tolerations += [t for t in DAEMON_TOLERATIONS if t not in tolerations]
        pod_spec["tolerations"] = tolerations
        for pod in owned:  # failed daemon pods are replaced, as upstream does
            if pod_phase(pod) == "Failed" and not is_terminating(pod):
                self._delete("", "pods", pod)
        active = [p for p in owned if is_active(p)]
        by_node: dict[str, list[JsonDict]] = {}
        for pod in active:
            by_node.setdefault(str(spec(pod).get("nodeName") or ""), []).append(pod)
        eligible = [
            meta(n)["name"]
            for n in nodes
            if node_fits(pod_spec, n) is None and untolerated_taint(tolerations, n) is None
        ]
        for node_name, pods in by_node.items():
            if node_name not in eligible:
                for pod in pods:
                    self._delete("", "pods", pod)
            else:
                for pod in sorted(pods, key=_deletion_rank)[: len(pods) - 1]:
                    self._delete("", "pods", pod)
        for node_name in eligible:
            if not by_node.get(node_name):
                pod = self._new_pod(ds, template, labels={REVISION_HASH: thash})
                pod["spec"]["nodeName"] = node_name  # daemon pods are bound by their controller
                self._create("", "pods", pod)
        placed = {n: sorted(by_node[n], key=_deletion_rank)[-1] for n in eligible if by_node.get(n)}
        min_ready = int(dspec.get("minReadySeconds") or 0)
        available = sum(1 for p in placed.values() if is_available(p, min_ready, self._now))
        updated = [p for p in placed.values() if (meta(p).get("labels") or {}).get(REVISION_HASH) == thash]
        strategy = dspec.get("updateStrategy") or {}
        if strategy.get("type", "RollingUpdate") == "RollingUpdate":
            max_unavailable = max(
                1,
                resolve_int_or_percent(
                    (strategy.get("rollingUpdate") or {}).get("maxUnavailable"),
                    len(eligible),
                    round_up=False,
                    default="1",
                ),
            )
            outdated = sorted(
                (p for p in placed.values() if p not in updated), key=lambda p: (is_available(p, min_ready, self._now),)
            )
            budget = max_unavailable - (len(eligible) - available)
            for pod in outdated:
                if budget <= 0 and is_available(pod, min_ready, self._now):
                    break
                self._delete("", "pods", pod)
                if is_available(pod, min_ready, self._now):
                    budget -= 1
        new_status = {
            "observedGeneration": meta(ds).get("generation", 1),
            "desiredNumberScheduled": len(eligible),
            "currentNumberScheduled": len(placed),
            "numberMisscheduled": sum(len(p) for n, p in by_node.items() if n not in eligible),
            "numberReady": sum(1 for p in placed.values() if is_ready(p)),
            "numberAvailable": available,
            "numberUnavailable": len(eligible) - available,
            "updatedNumberScheduled": len(updated),
        }
        if not new_status["numberUnavailable"]:
            del new_status["numberUnavailable"]
        self._write_status("apps", "daemonsets", ds, new_status)

    # ------------------------------------------------------------------ StatefulSet

    def _sync_statefulset(self, sts: JsonDict, owned: list[JsonDict]) -> None:
        sspec = spec(sts)
        name = meta(sts)["name"]
        replicas = int(sspec.get("replicas", 1))
        template = sspec.get("template") or {}
        revision = f"{name}-{template_hash(template)}"
        ordered = sspec.get("podManagementPolicy", "OrderedReady") != "Parallel"
        pods: dict[int, JsonDict] = {}
        for pod in owned:
            suffix = meta(pod)["name"].removeprefix(f"{name}-")
            if suffix.isdigit():
                pods[int(suffix)] = pod
        for ordinal, pod in list(pods.items()):  # a finished pod is replaced under its name
            if pod_phase(pod) in ("Failed", "Succeeded") and not is_terminating(pod):
                self._delete("", "pods", pod)
                del pods[ordinal]

        def healthy(pod: JsonDict | None) -> bool:
            return pod is not None and pod_phase(pod) == "Running" and is_ready(pod) and not is_terminating(pod)

        blocked = False
        for ordinal in range(replicas):
            existing = pods.get(ordinal)
            if existing is None:
                if blocked:
                    break
                labels = {
                    REVISION_HASH: revision,
                    "statefulset.kubernetes.io/pod-name": f"{name}-{ordinal}",
                    "apps.kubernetes.io/pod-index": str(ordinal),
                }
                new = self._new_pod(sts, template, name=f"{name}-{ordinal}", labels=labels)
                new["spec"]["hostname"] = f"{name}-{ordinal}"
                if sspec.get("serviceName"):
                    new["spec"]["subdomain"] = sspec["serviceName"]
                self._create("", "pods", new)
                blocked = ordered
            elif ordered and not healthy(existing):
                blocked = True
        extra = sorted((o for o in pods if o >= replicas), reverse=True)
        if extra and (not ordered or all(healthy(pods[o]) for o in pods if o < replicas)):
            for ordinal in extra[:1] if ordered else extra:
                if not is_terminating(pods[ordinal]):
                    self._delete("", "pods", pods[ordinal])
        strategy = sspec.get("updateStrategy") or {}
        in_range = [pods[o] for o in sorted(pods) if o < replicas]
        if strategy.get("type", "RollingUpdate") == "RollingUpdate" and len(in_range) == replicas:
            partition = int((strategy.get("rollingUpdate") or {}).get("partition", 0))
            outdated = [
                o for o in sorted(pods, reverse=True)
                if partition <= o < replicas and (meta(pods[o]).get("labels") or {}).get(REVISION_HASH) != revision
            ]  # fmt: skip
            if outdated and all(healthy(p) for p in in_range):
                self._delete("", "pods", pods[outdated[0]])
        current_rev = status(sts).get("currentRevision") or revision
        revs = [(meta(p).get("labels") or {}).get(REVISION_HASH) for p in in_range]
        updated = sum(1 for r in revs if r == revision)
        if updated == replicas and all(healthy(p) for p in in_range):
            current_rev = revision
        active = [p for p in pods.values() if is_active(p)]
        min_ready = int(sspec.get("minReadySeconds") or 0)
        new_status = {
            "observedGeneration": meta(sts).get("generation", 1),
            "replicas": len(active),
            "readyReplicas": sum(1 for p in active if is_ready(p)),
            "availableReplicas": sum(1 for p in active if is_available(p, min_ready, self._now)),
            "currentReplicas": sum(1 for r in revs if r == current_rev),
            "updatedReplicas": updated,
            "currentRevision": current_rev,
            "updateRevision": revision,
            "collisionCount": 0,
        }
        self._write_status("apps", "statefulsets", sts, new_status)
