"""Services of the local cluster: the endpoints controller and kube-proxy, for every node.

Why: a Service only means something if its address leads to the pods behind it. In a
real cluster two components make that true: the endpoints controller (part of
kube-controller-manager) keeps ``Endpoints`` and ``EndpointSlice`` objects listing the
ready pods that match each Service's selector, and kube-proxy on every node turns
Services and their endpoints into packet rewriting. Here one :class:`ServiceRouter` does
both for the simulated nodes:

* it list-watches Services and Pods, computes every Service's endpoints
  (:func:`endpoints_of`: ready pods, or all running ones with
  ``publishNotReadyAddresses``; named ``targetPort``\\ s resolved per pod) and writes them
  to the API server as an ``Endpoints`` object and one ``EndpointSlice``
  (what headless Services and ``kubectl get endpoints`` show);
* it programs each node's network namespace the way kube-proxy's iptables mode does
  (:func:`nat_rules`): traffic to ``clusterIP:port`` — from a pod (PREROUTING) or from the
  node itself (OUTPUT) — jumps to a per-Service chain that picks one endpoint with
  ``statistic --mode random`` and DNATs to it. Connections that were DNATed are
  masqueraded, so replies always come back through the node that rewrote them, whichever
  node (or the same bridge) the endpoint is on. A Service with no endpoints is REJECTed
  (:func:`reject_rules`), so clients fail fast as with kube-proxy, instead of timing out.

It also keeps the table of names the cluster DNS (:mod:`pairvol.localcluster.dns`) answers
from, built from the same Services and Pods.

ClusterIPs are allocated by the API server from :data:`~pairvol.localcluster.netns.SERVICE_CIDR`;
headless Services (``clusterIP: None``) get endpoints only. The rules live in each node's
own namespace: the nat table of a node namespace is ours alone (a whole-table
``iptables-restore``), in the filter table only the ``PVSVC-REJECT`` chain is. They go with
the namespace when the cluster is torn down. A partitioned node keeps its last rules, as
a kube-proxy cut off from the API server would.

Pure rule building is separate from the I/O so that what we ask the kernel for is
testable without namespaces.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pairvol.localcluster.dns import cluster_records
from pairvol.localcluster.kubelet_api import MERGE_PATCH, ApiError, KubeApi
from pairvol.localcluster.kubelet_pods import JsonDict, meta, spec
from pairvol.localcluster.netns import run_command

logger = logging.getLogger(__name__)

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
MANAGED_BY_LABEL = "endpointslice.kubernetes.io/managed-by"
MANAGED_BY = "endpointslice-controller.k8s.io"
SERVICES_CHAIN = "PVSVC-SERVICES"
REJECT_CHAIN = "PVSVC-REJECT"


# ---------------------------------------------------------------------------------------
# pure: endpoints
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Endpoint:
    """One pod behind one Service port."""

    ip: str
    port: int
    ready: bool
    pod: str
    node: str
    uid: str


@dataclass(frozen=True)
class ServicePort:
    name: str
    protocol: str
    port: int
    endpoints: tuple[Endpoint, ...]


@dataclass(frozen=True)
class ServiceView:
    namespace: str
    name: str
    uid: str
    cluster_ip: str  # "" or "None" for headless
    ports: tuple[ServicePort, ...]

    @property
    def headless(self) -> bool:
        return self.cluster_ip in ("", "None")


def selector_matches(selector: Mapping[str, Any], labels: Mapping[str, Any]) -> bool:
    """A Service selector (equality only) against a pod's labels; empty selects nothing
    (a Service without selector has manually managed endpoints)."""
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def _pod_ready(pod: Mapping[str, Any]) -> bool:
    conditions = (pod.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def _target_port(port: Mapping[str, Any], pod: Mapping[str, Any]) -> int | None:
    """The pod's port for a Service port: a number, or a named container port (a pod
    without that name is not an endpoint of this port)."""
    target = port.get("targetPort", port.get("port"))
    if isinstance(target, int):
        return target
    if isinstance(target, str) and target.isdigit():
        return int(target)
    for container in spec(pod).get("containers") or []:
        for declared in container.get("ports") or []:
            if declared.get("name") == target and declared.get("protocol", "TCP") == port.get("protocol", "TCP"):
                return int(declared["containerPort"])
    return None


def endpoints_of(service: Mapping[str, Any], pods: Iterable[Mapping[str, Any]]) -> ServiceView:
    """The Service with the endpoints of each of its ports, from the pods that exist."""
    m, s = meta(service), spec(service)
    namespace = str(m.get("namespace") or "default")
    selector = s.get("selector") or {}
    publish_not_ready = bool(s.get("publishNotReadyAddresses", False))
    chosen = []
    for pod in pods:
        pm = meta(pod)
        status = pod.get("status") or {}
        if str(pm.get("namespace") or "default") != namespace or pm.get("deletionTimestamp"):
            continue
        if not selector_matches(selector, pm.get("labels") or {}):
            continue
        if not status.get("podIP") or status.get("phase") in ("Succeeded", "Failed"):
            continue
        chosen.append(pod)
    chosen.sort(key=lambda p: (str(meta(p).get("name")), str(meta(p).get("uid"))))
    ports = []
    for port in s.get("ports") or []:
        endpoints = []
        for pod in chosen:
            target = _target_port(port, pod)
            if target is None:
                continue
            endpoints.append(
                Endpoint(
                    ip=str(pod["status"]["podIP"]),
                    port=target,
                    ready=publish_not_ready or _pod_ready(pod),
                    pod=str(meta(pod).get("name")),
                    node=str(spec(pod).get("nodeName") or ""),
                    uid=str(meta(pod).get("uid") or ""),
                )
            )
        ports.append(
            ServicePort(
                name=str(port.get("name") or ""),
                protocol=str(port.get("protocol") or "TCP"),
                port=int(port.get("port", 0)),
                endpoints=tuple(endpoints),
            )
        )
    return ServiceView(
        namespace=namespace,
        name=str(m.get("name")),
        uid=str(m.get("uid") or ""),
        cluster_ip=str(s.get("clusterIP") or ""),
        ports=tuple(ports),
    )


def endpoints_object(view: ServiceView) -> JsonDict:
    """The core/v1 Endpoints the endpoints controller keeps for a Service."""
    subsets = []
    for port in view.ports:
        ready = [e for e in port.endpoints if e.ready]
        not_ready = [e for e in port.endpoints if not e.ready]
        if not port.endpoints:
            continue
        by_target: dict[int, list[Endpoint]] = {}
        for e in port.endpoints:
            by_target.setdefault(e.port, []).append(e)
        for target in sorted(by_target):
            subset: JsonDict = {"ports": [{"name": port.name, "port": target, "protocol": port.protocol}]}
            if addresses := [_address(e) for e in ready if e.port == target]:
                subset["addresses"] = addresses
            if not_ready_addresses := [_address(e) for e in not_ready if e.port == target]:
                subset["notReadyAddresses"] = not_ready_addresses
            subsets.append(subset)
    return {
        "apiVersion": "v1",
        "kind": "Endpoints",
        "metadata": {"name": view.name, "namespace": view.namespace, "labels": {SERVICE_NAME_LABEL: view.name}},
        "subsets": subsets,
    }


def _address(e: Endpoint) -> JsonDict:
    return {
        "ip": e.ip,
        "nodeName": e.node,
        "targetRef": {"kind": "Pod", "name": e.pod, "uid": e.uid},
    }


def endpoint_slice_name(view: ServiceView) -> str:
    digest = hashlib.sha256(f"{view.namespace}/{view.name}".encode()).hexdigest()[:5]
    return f"{view.name[:57]}-{digest}"


def endpoint_slice_object(view: ServiceView) -> JsonDict:
    """The discovery.k8s.io/v1 EndpointSlice (one per Service here) for a Service."""
    pods: dict[str, Endpoint] = {}
    for port in view.ports:
        for e in port.endpoints:
            pods.setdefault(e.uid or e.pod, e)
    ports = []
    for port in view.ports:
        targets = {e.port for e in port.endpoints}
        if len(targets) == 1:
            ports.append({"name": port.name, "port": next(iter(targets)), "protocol": port.protocol})
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": endpoint_slice_name(view),
            "namespace": view.namespace,
            "labels": {SERVICE_NAME_LABEL: view.name, MANAGED_BY_LABEL: MANAGED_BY},
            "ownerReferences": [
                {
                    "apiVersion": "v1",
                    "kind": "Service",
                    "name": view.name,
                    "uid": view.uid,
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        },
        "addressType": "IPv4",
        "endpoints": [
            {
                "addresses": [e.ip],
                "conditions": {"ready": e.ready, "serving": e.ready, "terminating": False},
                "nodeName": e.node,
                "targetRef": {"kind": "Pod", "namespace": view.namespace, "name": e.pod, "uid": e.uid},
            }
            for e in sorted(pods.values(), key=lambda e: e.pod)
        ],
        "ports": ports,
    }


# ---------------------------------------------------------------------------------------
# pure: iptables rules (kube-proxy's iptables mode, reduced to what the cluster needs)
# ---------------------------------------------------------------------------------------


def _chain(prefix: str, *parts: str) -> str:
    """A chain name of at most 28 characters (the iptables limit), stable per input."""
    return f"{prefix}-" + hashlib.sha256("/".join(parts).encode()).hexdigest()[:16].upper()


def _routable(views: Iterable[ServiceView]) -> list[tuple[ServiceView, ServicePort]]:
    return [
        (view, port)
        for view in sorted(views, key=lambda v: (v.namespace, v.name))
        if not view.headless
        for port in view.ports
        if port.protocol in ("TCP", "UDP", "SCTP")
    ]


def nat_rules(views: Iterable[ServiceView]) -> str:
    """The whole nat table of a node namespace, as ``iptables-restore`` input."""
    head = [
        "*nat",
        ":PREROUTING ACCEPT [0:0]",
        ":INPUT ACCEPT [0:0]",
        ":OUTPUT ACCEPT [0:0]",
        ":POSTROUTING ACCEPT [0:0]",
        f":{SERVICES_CHAIN} - [0:0]",
    ]
    body = [
        f'-A PREROUTING -m comment --comment "pairvol local cluster services" -j {SERVICES_CHAIN}',
        f'-A OUTPUT -m comment --comment "pairvol local cluster services" -j {SERVICES_CHAIN}',
        # replies to a rewritten connection must come back through this node to be un-DNATed
        "-A POSTROUTING -m conntrack --ctstate DNAT -j MASQUERADE",
    ]
    for view, port in _routable(views):
        ready = [e for e in port.endpoints if e.ready]
        if not ready:
            continue
        proto = port.protocol.lower()
        svc_chain = _chain("PVSVC", view.namespace, view.name, port.name, str(port.port))
        head.append(f":{svc_chain} - [0:0]")
        comment = f"{view.namespace}/{view.name}:{port.name}" if port.name else f"{view.namespace}/{view.name}"
        body.append(
            f"-A {SERVICES_CHAIN} -d {view.cluster_ip}/32 -p {proto} -m {proto} --dport {port.port} "
            f'-m comment --comment "{comment}" -j {svc_chain}'
        )
        for index, e in enumerate(ready):
            sep_chain = _chain("PVSEP", view.namespace, view.name, port.name, str(port.port), e.ip, str(e.port))
            head.append(f":{sep_chain} - [0:0]")
            remaining = len(ready) - index
            pick = f"-m statistic --mode random --probability {1 / remaining:.10f} " if remaining > 1 else ""
            body.append(f"-A {svc_chain} {pick}-j {sep_chain}")
            body.append(f"-A {sep_chain} -p {proto} -m {proto} -j DNAT --to-destination {e.ip}:{e.port}")
    return "\n".join([*head, *body, "COMMIT", ""])


def reject_rules(views: Iterable[ServiceView]) -> str:
    """Our chain of the filter table (``iptables-restore --noflush`` input): refuse
    connections to Services that have no ready endpoint."""
    lines = ["*filter", f":{REJECT_CHAIN} - [0:0]"]
    for view, port in _routable(views):
        if any(e.ready for e in port.endpoints):
            continue
        proto = port.protocol.lower()
        lines.append(
            f"-A {REJECT_CHAIN} -d {view.cluster_ip}/32 -p {proto} -m {proto} --dport {port.port} "
            f'-m comment --comment "{view.namespace}/{view.name} has no endpoints" '
            "-j REJECT --reject-with icmp-port-unreachable"
        )
    return "\n".join([*lines, "COMMIT", ""])


def reject_hooks(action: str) -> list[list[str]]:
    """The jumps into :data:`REJECT_CHAIN` (installed once per node)."""
    return [["iptables", "-w", action, chain, "-j", REJECT_CHAIN] for chain in ("INPUT", "OUTPUT", "FORWARD")]


# ---------------------------------------------------------------------------------------
# I/O
# ---------------------------------------------------------------------------------------


class _Informer:
    """A list-watched collection kept in memory; calls ``on_change`` after every change."""

    def __init__(self, api: KubeApi, path: str, on_change: Callable[[], None]) -> None:
        self._api = api
        self._path = path
        self._on_change = on_change
        self.objects: dict[str, JsonDict] = {}
        self.synced = asyncio.Event()

    @staticmethod
    def _key(obj: Mapping[str, Any]) -> str:
        m = meta(obj)
        return f"{m.get('namespace')}/{m.get('name')}"

    async def run(self) -> None:
        while True:
            try:
                items, version = await self._api.list_all(self._path)
                self.objects = {self._key(o): o for o in items}
                self.synced.set()
                self._on_change()
                async for event in self._api.watch(self._path, version):
                    kind, obj = event.get("type"), event.get("object") or {}
                    if kind == "ERROR":
                        break
                    if kind == "DELETED":
                        self.objects.pop(self._key(obj), None)
                    elif kind in ("ADDED", "MODIFIED"):
                        self.objects[self._key(obj)] = obj
                    else:
                        continue
                    self._on_change()
            except asyncio.CancelledError:
                raise
            except (ApiError, ValueError) as exc:
                logger.debug("watch of %s ended (%s); relisting", self._path, exc)
            await asyncio.sleep(0.5)


class ServiceRouter:
    """Endpoints controller + kube-proxy for the nodes of one cluster network.

    ``node_namespaces`` names each node's network namespace; ``await start()``,
    ``await close()``. Rules are rewritten whenever Services or Pods change, on the nodes
    that are ``connected``; call :meth:`resync` when one is again.
    """

    def __init__(
        self,
        api: KubeApi,
        node_namespaces: Mapping[str, str],
        *,
        settle: float = 0.2,
        connected: Callable[[str], bool] = lambda node: True,
    ) -> None:
        self._api = api
        self._nodes = dict(node_namespaces)
        self._connected = connected  # False: that node's proxy cannot hear the API server
        self._settle = settle
        self._dirty = asyncio.Event()
        self._services = _Informer(api, "/api/v1/services", self._dirty.set)
        self._pods = _Informer(api, "/api/v1/pods", self._dirty.set)
        self._tasks: list[asyncio.Task[None]] = []
        self._applied: dict[str, tuple[str, str]] = {}  # node -> (nat, filter) last applied
        self._written: dict[tuple[str, str], tuple[JsonDict, JsonDict]] = {}  # (ns, svc) -> objects
        self._write_objects = True  # off if the API server does not serve Endpoints
        self.generation = 0  # bumped after every completed sync
        self.dns_records: dict[str, tuple[str, ...]] = {}  # what the cluster DNS answers

    async def start(self) -> None:
        for namespace in self._nodes.values():
            prefix = ["ip", "netns", "exec", namespace]
            await run_command([*prefix, "iptables-restore", "--noflush"], stdin=reject_rules([]).encode())
            for argv in reject_hooks("-I"):
                await run_command([*prefix, *argv])
        self._tasks = [
            asyncio.create_task(self._services.run(), name="services-informer"),
            asyncio.create_task(self._pods.run(), name="pods-informer"),
            asyncio.create_task(self._sync_loop(), name="service-router"),
        ]

    def resync(self) -> None:
        """Bring every connected node up to date (e.g. after a partition healed)."""
        self._dirty.set()

    async def close(self) -> None:
        # Cancelled until done: Python 3.11's asyncio.timeout can turn a cancellation that
        # coincides with its own expiry into a TimeoutError, which the sync loop survives
        # (seen once in CI: close() waited for ever)
        for task in self._tasks:
            while not task.done():
                task.cancel()
                await asyncio.wait({task}, timeout=1.0)
            with contextlib.suppress(BaseException):
                await task
        self._tasks = []

    async def _sync_loop(self) -> None:
        await self._services.synced.wait()
        await self._pods.synced.wait()
        while True:
            await self._dirty.wait()
            await asyncio.sleep(self._settle)  # coalesce a burst of changes
            self._dirty.clear()
            try:
                await self._sync()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # keep routing; the next change retries
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise asyncio.CancelledError from exc  # a cancel that arrived as a timeout
                logger.warning("service sync failed: %s", exc)
                logger.debug("service sync failed", exc_info=True)
                self._dirty.set()
                await asyncio.sleep(1.0)
                continue
            self.generation += 1

    async def _sync(self) -> None:
        pods = list(self._pods.objects.values())
        views = [endpoints_of(s, pods) for s in self._services.objects.values()]
        self.dns_records = cluster_records(self._services.objects.values(), pods)
        if self._write_objects:
            try:
                await self._write_endpoints(views)
            except ApiError as exc:
                if exc.status != 404:
                    raise
                logger.warning("the API server does not serve Endpoints/EndpointSlices (%s); routing only", exc)
                self._write_objects = False
        nat, reject = nat_rules(views), reject_rules(views)
        for node, namespace in self._nodes.items():
            if self._applied.get(node) == (nat, reject) or not self._connected(node):
                continue
            prefix = ["ip", "netns", "exec", namespace]
            await run_command([*prefix, "iptables-restore"], stdin=nat.encode())
            await run_command([*prefix, "iptables-restore", "--noflush"], stdin=reject.encode())
            self._applied[node] = (nat, reject)

    async def _write_endpoints(self, views: Sequence[ServiceView]) -> None:
        wanted = {(v.namespace, v.name): v for v in views}
        for key in [k for k in self._written if k not in wanted]:
            namespace, name = key
            del self._written[key]
            # the Service is gone: so are its endpoints (the slice also by garbage collection)
            for path in (
                f"/api/v1/namespaces/{namespace}/endpoints/{name}",
                f"/apis/discovery.k8s.io/v1/namespaces/{namespace}/endpointslices/"
                f"{endpoint_slice_name(ServiceView(namespace, name, '', '', ()))}",
            ):
                with contextlib.suppress(ApiError):
                    await self._api.request("DELETE", path)
        for key, view in wanted.items():
            objects = (endpoints_object(view), endpoint_slice_object(view))
            if self._written.get(key) == objects:
                continue
            await self._put(f"/api/v1/namespaces/{view.namespace}/endpoints", objects[0])
            await self._put(f"/apis/discovery.k8s.io/v1/namespaces/{view.namespace}/endpointslices", objects[1])
            self._written[key] = objects

    async def _put(self, collection: str, obj: JsonDict) -> None:
        """Create, or replace the content of, one object (merge patch replaces lists whole)."""
        try:
            await self._api.request("POST", collection, body=obj)
            return
        except ApiError as exc:
            if exc.status != 409:
                raise
        name = obj["metadata"]["name"]
        patch = {k: v for k, v in obj.items() if k not in ("apiVersion", "kind")}
        await self._api.request("PATCH", f"{collection}/{name}", body=patch, content_type=MERGE_PATCH)
