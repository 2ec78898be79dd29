"""``LocalCluster``: the emulated API server, our CRDs, nodes and a kubeconfig, as one unit.

Why: tests, ``make demo`` and ``pairvol localcluster up`` all need the same thing — an API
server on a free port with the CRDs from ``crds/`` registered, a set of Ready nodes, the
scheduler and workload controllers (:mod:`pairvol.localcluster.controllers`; off with
``controllers=False``) and a kubeconfig that kubectl, kopf and the ``kubernetes`` client
can use. One async context manager keeps that setup (and its teardown) identical
everywhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import os
import shutil
import tempfile
from pathlib import Path
from types import TracebackType
from typing import Any

import yaml

from pairvol.errors import PairvolError
from pairvol.localcluster import kubeconfig as kubeconfig_mod
from pairvol.localcluster.apiserver import APIServer, serve
from pairvol.localcluster.apiserver_logic import RequestError, now_rfc3339
from pairvol.localcluster.controllers import ControllerManager

logger = logging.getLogger(__name__)


class LocalClusterError(PairvolError):
    """The local cluster could not be set up as asked."""


def default_crds_dir() -> Path | None:
    """``$PAIRVOL_CRDS_DIR``, else the repository's ``crds/`` next to the package."""
    env = os.environ.get("PAIRVOL_CRDS_DIR")
    if env:
        return Path(env)
    candidate = Path(__file__).resolve().parents[3] / "crds"
    return candidate if candidate.is_dir() else None


def node_object(
    name: str, ready: bool = True, labels: dict[str, str] | None = None, address: str = "127.0.0.1"
) -> dict[str, Any]:
    """A minimal Node as a kubelet would register it (pure)."""
    now = now_rfc3339()
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": {
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                **(labels or {}),
            },
        },
        "spec": {},
        "status": {
            "conditions": [_ready_condition(ready, now)],
            "addresses": [
                {"type": "InternalIP", "address": address},
                {"type": "Hostname", "address": name},
            ],
            "capacity": {"cpu": "2", "memory": "4Gi", "pods": "110"},
            "allocatable": {"cpu": "2", "memory": "4Gi", "pods": "110"},
            # All fields the kubernetes client's V1NodeSystemInfo requires.
            "nodeInfo": {
                "machineID": name,
                "systemUUID": name,
                "bootID": name,
                "kernelVersion": "emulated",
                "osImage": "pairvol localcluster",
                "containerRuntimeVersion": "pairvol://local-processes",
                "kubeletVersion": "v1.32.0-pairvol",
                "kubeProxyVersion": "v1.32.0-pairvol",
                "operatingSystem": "linux",
                "architecture": "amd64",
            },
        },
    }


def _ready_condition(ready: bool, now: str) -> dict[str, str]:
    return {
        "type": "Ready",
        "status": "True" if ready else "False",
        "reason": "KubeletReady" if ready else "NodeStatusUnknown",
        "message": "emulated node is ready" if ready else "emulated node stopped posting status",
        "lastHeartbeatTime": now,
        "lastTransitionTime": now,
    }


def _yaml_files(directory: Path) -> list[Path]:
    if not directory.is_dir():
        raise LocalClusterError(f"CRD directory {directory} does not exist; pass --crds DIR or set PAIRVOL_CRDS_DIR")
    return sorted(p for p in directory.iterdir() if p.suffix in (".yaml", ".yml"))


def _read_documents(path: Path) -> list[dict[str, Any]]:
    with path.open() as fh:
        return [doc for doc in yaml.safe_load_all(fh) if isinstance(doc, dict)]


class LocalCluster:
    """An emulated cluster; use ``async with LocalCluster(nodes=3) as cluster:``."""

    def __init__(
        self,
        nodes: int = 3,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        kubeconfig: Path | None = None,
        crds_dir: Path | None = None,
        load_crds: bool = True,
        simulate_nodes: bool = False,
        nodes_root: Path | None = None,
        controllers: bool = True,
        node_labels: dict[str, str] | None = None,
        service_account_tokens: bool = True,
    ) -> None:
        if nodes < 0:
            raise LocalClusterError(f"nodes must be >= 0, got {nodes}")
        self.node_count = nodes
        self.host = host
        self.port = port
        self._kubeconfig = kubeconfig
        self._crds_dir = crds_dir if crds_dir is not None else (default_crds_dir() if load_crds else None)
        self._stack: contextlib.AsyncExitStack | None = None
        self._api: APIServer | None = None
        self._url: str | None = None
        self._tmpdir: Path | None = None
        self.node_names: list[str] = [f"node-{i}" for i in range(1, nodes + 1)]
        # With simulate_nodes, the kubelet owner's NodeSimulator registers the nodes and
        # runs their pods as processes (needs root); otherwise nodes are plain Ready objects.
        self.simulate_nodes = simulate_nodes
        self._nodes_root = nodes_root
        self.simulator: Any = None
        # Simulated pods get a token of their ServiceAccount (held to its RBAC), as in a
        # real cluster; False: the nodes' admin kubeconfig.
        self.service_account_tokens = service_account_tokens
        # The scheduler and workload controllers (Deployment, Job, DaemonSet, StatefulSet).
        self.run_controllers = controllers
        self.node_labels = dict(node_labels or {})  # extra labels on every node
        self.controllers: ControllerManager | None = None

    # -------------------------------------------------------------- lifecycle

    async def __aenter__(self) -> LocalCluster:
        stack = contextlib.AsyncExitStack()
        try:
            api, url = await stack.enter_async_context(serve(self.host, self.port))
            self._api, self._url = api, url
            if self._kubeconfig is None:
                self._tmpdir = Path(tempfile.mkdtemp(prefix=f"pairvol-localcluster-{os.getpid()}-"))
                self._kubeconfig = self._tmpdir / "kubeconfig"
            await kubeconfig_mod.write(self._kubeconfig, url)
            if self._crds_dir is not None:
                await self.apply_dir(self._crds_dir)
            if self.simulate_nodes:
                self.simulator = await stack.enter_async_context(self._node_simulator())
                sim = self.simulator

                def pod_log(pod: dict[str, Any]) -> Path | None:
                    node = (pod.get("spec") or {}).get("nodeName")
                    meta = pod["metadata"]
                    return sim.log_path(node, meta["namespace"], meta["name"]) if node else None

                api.log_source = pod_log
            else:
                for name in self.node_names:
                    self.api.create_object("", "v1", "nodes", node_object(name, labels=self.node_labels))
            if self.run_controllers:  # entered last: stopped first, before nodes go away
                self.controllers = await stack.enter_async_context(ControllerManager(api))
        except BaseException:
            await stack.aclose()
            self._cleanup_tmp()
            raise
        self._stack = stack
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        stack, self._stack = self._stack, None
        try:
            if stack is not None:
                await stack.aclose()
        finally:
            self._api = None
            self.controllers = None
            self._cleanup_tmp()

    def _node_simulator(self) -> Any:
        from pairvol.localcluster.kubelet import NodeSimulator  # needs root; import lazily

        root = self._nodes_root
        if root is None:
            if self._tmpdir is None:
                self._tmpdir = Path(tempfile.mkdtemp(prefix=f"pairvol-localcluster-{os.getpid()}-"))
            root = self._tmpdir / "nodes"
        labels = {name: dict(self.node_labels) for name in self.node_names}
        return NodeSimulator(
            self.url,
            nodes=self.node_names,
            root=root,
            node_labels=labels,
            service_account_tokens=self.service_account_tokens,
        )

    def _cleanup_tmp(self) -> None:
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None

    # -------------------------------------------------------------- accessors

    @property
    def api(self) -> APIServer:
        if self._api is None:
            raise LocalClusterError("the local cluster is not running (use `async with`)")
        return self._api

    @property
    def url(self) -> str:
        if self._url is None:
            raise LocalClusterError("the local cluster is not running (use `async with`)")
        return self._url

    @property
    def kubeconfig_path(self) -> Path:
        if self._kubeconfig is None:
            raise LocalClusterError("the local cluster is not running (use `async with`)")
        return self._kubeconfig

    def kubernetes_configuration(self) -> Any:
        """A ``kubernetes.client.Configuration`` pointing at this cluster."""
        import kubernetes.client  # imported lazily: only callers that use the client pay

        config = kubernetes.client.Configuration()
        config.host = self.url
        config.api_key = {"authorization": "pairvol-localcluster"}
        config.api_key_prefix = {"authorization": "Bearer"}
        return config

    # -------------------------------------------------------------- objects

    def apply(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Create ``obj``, or replace it if it exists (like ``kubectl apply`` of a whole object)."""
        api_version, kind = obj.get("apiVersion", ""), obj.get("kind", "")
        rtype = self.api.type_for_kind(api_version, kind)
        if rtype is None:
            raise LocalClusterError(
                f"cannot apply {kind} {api_version}: the API server does not serve that kind; apply its CRD first"
            )
        group, version = rtype.group, rtype.version
        meta = obj.get("metadata") or {}
        ns = meta.get("namespace", "default") if rtype.namespaced else ""
        try:
            return self.api.create_object(group, version, rtype.plural, obj, ns or None)
        except RequestError as exc:
            if exc.code != 409:
                raise LocalClusterError(f"cannot apply {kind} {meta.get('name')}: {exc.message}") from exc
        current = self.api.get_object(rtype, ns, meta["name"])
        body = copy.deepcopy(obj)
        body.setdefault("metadata", {})["resourceVersion"] = current["metadata"]["resourceVersion"]
        try:
            return self.api.update_object(rtype, ns, meta["name"], body, None, require_rv=True)
        except RequestError as exc:
            raise LocalClusterError(f"cannot apply {kind} {meta.get('name')}: {exc.message}") from exc

    async def apply_file(self, path: Path) -> list[dict[str, Any]]:
        """Apply every document of a YAML file."""
        docs = await asyncio.to_thread(_read_documents, path)
        return [self.apply(doc) for doc in docs]

    async def apply_dir(self, directory: Path) -> list[dict[str, Any]]:
        """Apply every ``*.yaml``/``*.yml`` file in ``directory`` (sorted by name)."""
        paths = await asyncio.to_thread(_yaml_files, directory)
        applied: list[dict[str, Any]] = []
        for path in paths:
            applied += await self.apply_file(path)
        return applied

    def set_node_ready(self, name: str, ready: bool) -> dict[str, Any]:
        """Flip a node's Ready condition (what a dead kubelet looks like to the operator)."""
        rtype = self.api.resource_type("", "v1", "nodes")
        node = self.api.get_object(rtype, "", name)
        status = copy.deepcopy(node.get("status", {}))
        conditions = [c for c in status.get("conditions", []) if c.get("type") != "Ready"]
        status["conditions"] = [_ready_condition(ready, now_rfc3339()), *conditions]
        node["status"] = status
        return self.api.update_object(rtype, "", name, node, "status", require_rv=False)
