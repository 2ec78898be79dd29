"""``pairvol localcluster up|down|status|node``: a local Kubernetes-like cluster to try pairvol.

``up`` starts the emulated API server with our CRDs, N nodes (simulated by the node
simulator when run as root: pods run as processes in network namespaces; else plain Ready
Node objects), the scheduler and the workload controllers (Deployment, ReplicaSet, Job,
DaemonSet, StatefulSet, garbage collection), writes a kubeconfig and runs until
``pairvol localcluster down``, SIGINT or SIGTERM (``--detach``: in the background).

From any shell, while it runs:

  pairvol localcluster status                 nodes, their state and pods
  pairvol localcluster kubeconfig             the kubeconfig's path
  pairvol localcluster node kill NODE         power a node off (its pods' processes die)
  pairvol localcluster node restart NODE      power it on again
  pairvol localcluster node partition NODE    cut it off the network and the API server
  pairvol localcluster node heal NODE         reconnect it
  pairvol localcluster down                   stop everything

kubectl works against it: apply (client- and server-side), get/-w, describe, explain,
wait, logs, delete, rollout status, label, patch.

``up --operator --csi`` also runs the CSI driver ``pairvol.io`` as the e2e tests and ``make
demo`` run it (:class:`~pairvol.localcluster.csi_plugins.LocalCsi`: node plugins privileged on
every node, the controller with its ServiceAccount's token, a provisioner and a resizer doing
the sidecars' work) with the chart's CSIDriver, StorageClass and RBAC: pods mount volumes
through PersistentVolumeClaims. The chart's own CSI Deployment and DaemonSet are not run: their
sidecars are images of the Kubernetes sig-storage registry, which the nodes cannot run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from pairvol.errors import PairvolError
from pairvol.localcluster import control
from pairvol.localcluster.chart import NAMESPACE as OPERATOR_NAMESPACE
from pairvol.localcluster.chart import RELEASE as OPERATOR_RELEASE

logger = logging.getLogger(__name__)

# Every node may hold replicas: examples/manual.yaml selects nodes by this label.
NODE_LABELS = {"pairvol.io/storage": "true"}


class LocalClusterCLIError(PairvolError):
    """The command line asked for something this machine cannot do."""


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "localcluster",
        help="a local emulated Kubernetes cluster (API server, nodes, controllers) to try pairvol",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="localcluster_command", required=True, metavar="ACTION")

    def with_state_dir(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument(
            "--state-dir",
            type=Path,
            default=None,
            help="where the running cluster keeps its control socket and state "
            f"(default: $PAIRVOL_LOCALCLUSTER_DIR, else {control.default_state_dir()})",
        )
        p.set_defaults(run=run)
        return p

    up = with_state_dir(sub.add_parser("up", help="start the local cluster (foreground unless --detach)"))
    up.add_argument("--nodes", type=int, default=3, help="number of nodes (default 3)")
    up.add_argument("--host", default="127.0.0.1", help="API server address (default 127.0.0.1)")
    up.add_argument("--port", type=int, default=0, help="API server port (default 0: a free one)")
    up.add_argument(
        "--kubeconfig",
        type=Path,
        default=None,
        help="where to write the kubeconfig (default: <state dir>/kubeconfig, removed at exit)",
    )
    up.add_argument(
        "--crds", type=Path, default=None, help="directory of CRD YAML to apply (default: the repository's crds/)"
    )
    up.add_argument(
        "--simulate-nodes",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="run the node simulator (pods as processes in network namespaces; "
        "needs root). Default: on when running as root",
    )
    up.add_argument(
        "--nodes-root", type=Path, default=None, help="where the node simulator keeps node directories (default: temp)"
    )
    up.add_argument(
        "-d", "--detach", action="store_true", help="run in the background; return once the cluster is ready"
    )
    up.add_argument(
        "--operator",
        action="store_true",
        help=f"also install pairvol with `helm install {OPERATOR_RELEASE} charts/pairvol` "
        f"into namespace {OPERATOR_NAMESPACE}",
    )
    up.add_argument(
        "--watch-namespace",
        action="append",
        default=[],
        metavar="NS",
        help="with --operator: a namespace where volumes live (repeatable; created if missing; the chart's "
        "watchNamespaces). Default: default",
    )
    up.add_argument(
        "--csi",
        action="store_true",
        help="with --operator: also run the CSI driver pairvol.io with the chart's StorageClass (pods mount "
        "volumes through PersistentVolumeClaims; volumes live in the first --watch-namespace)",
    )
    status = with_state_dir(sub.add_parser("status", help="show the running local cluster"))
    status.add_argument("--json", action="store_true", help="print the status as one JSON object")
    with_state_dir(sub.add_parser("down", help="stop the running local cluster"))
    with_state_dir(
        sub.add_parser("kubeconfig", help="print the running cluster's kubeconfig path (export KUBECONFIG=$(...))")
    )
    node = with_state_dir(sub.add_parser("node", help="kill, partition, heal or restart a node"))
    node.add_argument("action", choices=control.NODE_ACTIONS)
    node.add_argument("node", metavar="NODE")


# ----------------------------------------------------------------------------- up


class _Running:
    """What the control socket's handler needs of the running ``up``."""

    def __init__(self, stop: asyncio.Event) -> None:
        self.stop = stop
        self.cluster: Any = None
        self.operator = "not installed (pass --operator to install it with helm)"
        self.csi = "not running (pass --operator --csi to run it)"

    async def handle(self, req: dict[str, Any]) -> dict[str, Any]:
        op = req.get("op")
        if op == "down":
            self.stop.set()
            return {"ok": True, "pid": os.getpid()}
        if self.cluster is None:
            raise control.ControlError("the local cluster is still starting; try again in a few seconds")
        if op == "status":
            return {"ok": True, **self.status()}
        if op == "node":
            return {"ok": True, "node": await self.node(str(req.get("action")), str(req.get("node")))}
        raise control.ControlError(f"unknown request {op!r}: use status, node or down")

    def status(self) -> dict[str, Any]:
        cluster = self.cluster
        api = cluster.api
        pods = api.list_objects(api.resource_type("", "v1", "pods"), None)
        sim = cluster.simulator
        nodes = []
        for node in api.list_objects(api.resource_type("", "v1", "nodes"), None):
            name = node["metadata"]["name"]
            ready = next(
                (c.get("status") for c in node.get("status", {}).get("conditions", []) if c.get("type") == "Ready"),
                "Unknown",
            )
            state = "object only"
            if sim is not None and name in sim.kubelets:
                kubelet = sim.kubelets[name]
                state = "killed" if not kubelet.alive else "partitioned" if kubelet.partitioned else "running"
            count = sum(
                1
                for p in pods
                if p.get("spec", {}).get("nodeName") == name
                and p.get("status", {}).get("phase") not in ("Succeeded", "Failed")
            )
            nodes.append({"name": name, "ready": ready, "state": state, "pods": count})
        return {
            "pid": os.getpid(),
            "url": cluster.url,
            "kubeconfig": str(cluster.kubeconfig_path),
            "simulated": sim is not None,
            "nodes_root": str(sim.root) if sim is not None else None,
            "nodes": nodes,
            "operator": self.operator,
            "csi": self.csi,
        }

    async def node(self, action: str, name: str) -> dict[str, Any]:
        cluster = self.cluster
        if action not in control.NODE_ACTIONS:
            raise control.ControlError(f"unknown node action {action!r}: use one of {', '.join(control.NODE_ACTIONS)}")
        sim = cluster.simulator
        if sim is None:
            raise control.ControlError(
                "the nodes are plain Node objects (started with --no-simulate-nodes, or not as root): there is "
                "nothing to kill or partition; start the cluster as root to simulate nodes"
            )
        if name not in sim.kubelets:
            raise control.ControlError(f"there is no node {name!r}; nodes: {', '.join(sim.kubelets)}")
        kubelet = sim.kubelets[name]
        if action == "restart" and kubelet.alive:
            raise control.ControlError(f"node {name} is running; `node kill {name}` first")
        if action in ("kill", "partition") and not kubelet.alive:
            raise control.ControlError(f"node {name} is already killed; `node restart {name}` powers it on")
        method = {
            "kill": sim.kill_node,
            "restart": sim.restart_node,
            "partition": sim.partition_node,
            "heal": sim.heal_node,
        }[action]
        try:
            await method(name)
        except Exception as exc:  # a failure of one action must not stop the cluster
            logger.warning("node %s %s failed: %s", action, name, exc)
            raise control.ControlError(f"node {action} {name} failed: {exc}") from exc
        logger.info("node %s: %s", name, action)
        grace = f"{sim.node_monitor_grace:g}"
        said = {
            "kill": f"killed: its processes are gone; Ready turns Unknown after {grace} s without heartbeats",
            "restart": "restarted: it registers Ready again and restarts the pods bound to it",
            "partition": f"partitioned: cut off from the other nodes and the API server; Ready turns Unknown "
            f"after {grace} s; its processes keep running",
            "heal": "healed: connected again",
        }[action]
        node: dict[str, Any] = next(n for n in self.status()["nodes"] if n["name"] == name)
        return {**node, "message": said}


def _namespace_names(values: list[str]) -> list[str]:
    names = list(dict.fromkeys(values or ["default"]))
    for name in names:
        if not re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name) or len(name) > 63:
            raise LocalClusterCLIError(
                f"--watch-namespace {name!r} is not a namespace name (lower-case letters, digits and '-', "
                "at most 63, starting and ending with a letter or digit)"
            )
    return names


async def _install_operator(cluster: Any, namespaces: list[str]) -> str:
    """``helm install`` the chart, watching ``namespaces`` (created first: the chart puts the
    agents' ServiceAccount and Role there); one line for the user (never raises)."""
    from pairvol.localcluster import chart

    if cluster.simulator is None:
        return "not installed: the nodes are not simulated (--no-simulate-nodes, or not root), nothing would run it"
    api = cluster.api
    existing = {ns["metadata"]["name"] for ns in api.list_objects(api.resource_type("", "v1", "namespaces"), None)}
    for name in namespaces:  # as `kubectl create namespace`, where missing
        if name not in existing:
            cluster.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
    try:
        await chart.install(cluster.kubeconfig_path, {"watchNamespaces": namespaces}, within=120)
    except chart.ChartInstallError as exc:
        return (
            f"not installed: {exc} (see `kubectl get pods -n {OPERATOR_NAMESPACE}`, "
            f"`kubectl describe pods -n {OPERATOR_NAMESPACE}` and the node logs)"
        )
    return (
        f"installed: helm release {OPERATOR_RELEASE} in namespace {OPERATOR_NAMESPACE}, "
        f"watching namespace{'s' if len(namespaces) > 1 else ''} {', '.join(namespaces)}"
    )


#: How long the CSI controller's ServiceAccount token is valid (no kubelet rotates it here).
CSI_TOKEN_LIFETIME_S = 7 * 24 * 3600


@dataclasses.dataclass
class _DriverHost:
    """What :func:`~pairvol.localcluster.demo_pvc.start_driver` needs of a running stack."""

    cluster: Any
    sim: Any
    root: Path
    namespace: str


async def _start_csi(cluster: Any, namespace: str, state_dir: Path) -> tuple[Any, str]:
    """Start the CSI driver for volumes in ``namespace``: (the driver or None, one line for
    the user). Never raises: a driver that cannot start leaves the cluster running."""
    from pairvol.localcluster import demo_pvc

    root = state_dir / "csi"
    host = _DriverHost(cluster, cluster.simulator, root, namespace)
    try:
        await asyncio.to_thread(root.mkdir, parents=True, exist_ok=True)
        driver = await demo_pvc.start_driver(
            host, {"watchNamespaces": [namespace]}, token_lifetime_s=CSI_TOKEN_LIFETIME_S
        )
    except Exception as exc:  # the cluster stays up: say why
        logger.debug("CSI driver start failed", exc_info=True)
        return None, f"not running: {exc} (logs in {root})"
    nodes = ", ".join(driver.csi.node_plugins)
    return driver, (
        f"pairvol.io running: node plugins on {nodes}, StorageClass {driver.storage_class}, volumes in "
        f"namespace {namespace}, logs in {root}"
    )


def _banner(status: dict[str, Any], state_dir: Path) -> str:
    kind = "simulated (pods run as processes)" if status["simulated"] else "Ready objects only"
    names = ", ".join(n["name"] for n in status["nodes"]) or "(none)"
    lines = [
        f"pairvol localcluster: API server {status['url']}, nodes ({kind}): {names}",
        "controllers: scheduler, Deployment, ReplicaSet, Job, DaemonSet, StatefulSet, garbage collector",
        f"operator: {status['operator']}",
        f"CSI driver: {status['csi']}",
        f"state: {state_dir} (pid {status['pid']})",
        f"kubeconfig: {status['kubeconfig']}",
        "use it:",
        f"  export KUBECONFIG={status['kubeconfig']}",
        "  kubectl get nodes",
        "  pairvol localcluster status | node kill|partition|heal|restart NODE | down",
    ]
    return "\n".join(lines)


def _import_cluster() -> Any:
    try:
        from pairvol.localcluster.cluster import LocalCluster
    except ModuleNotFoundError as exc:
        if exc.name and not exc.name.startswith("pairvol"):
            raise LocalClusterCLIError(
                f"the local cluster needs the Python package {exc.name!r}, which is not installed: "
                "install pairvol with its localcluster extra (pip install 'pairvol[localcluster]')"
            ) from exc
        raise
    return LocalCluster


async def _up(args: argparse.Namespace, state_dir: Path) -> int:
    LocalCluster = _import_cluster()

    simulate = args.simulate_nodes if args.simulate_nodes is not None else os.geteuid() == 0
    if simulate and os.geteuid() != 0:
        raise LocalClusterCLIError(
            "--simulate-nodes needs root (network namespaces, cgroups); run as root or pass "
            "--no-simulate-nodes for plain Ready Node objects"
        )
    if args.nodes < 0:
        raise LocalClusterCLIError(f"--nodes must be 0 or more, got {args.nodes}")
    if args.watch_namespace and not args.operator:
        raise LocalClusterCLIError("--watch-namespace is a setting of the operator's install: add --operator")
    if args.csi and not args.operator:
        raise LocalClusterCLIError(
            "--csi needs --operator: the driver's volumes are ReplicatedVolumes, which the operator replicates"
        )
    if args.csi and not simulate:
        raise LocalClusterCLIError("--csi needs simulated nodes (root): the node plugins mount on the nodes")
    namespaces = _namespace_names(args.watch_namespace)
    if not args.verbose:  # one access-log line per request drowns the useful output
        logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    running = _Running(stop)
    own_kubeconfig = args.kubeconfig is None
    kubeconfig = args.kubeconfig if args.kubeconfig is not None else state_dir / "kubeconfig"
    try:
        async with control.ControlServer(state_dir, running.handle):
            try:
                async with LocalCluster(
                    args.nodes,
                    host=args.host,
                    port=args.port,
                    kubeconfig=kubeconfig,
                    crds_dir=args.crds,
                    simulate_nodes=simulate,
                    nodes_root=args.nodes_root,
                    node_labels=NODE_LABELS,
                ) as cluster:
                    running.cluster = cluster
                    if args.operator:
                        running.operator = "installing (helm install)"
                        print("pairvol localcluster: installing the operator with helm ...", flush=True)
                        running.operator = await _install_operator(cluster, namespaces)
                    driver = None
                    if args.csi:
                        running.csi = "starting"
                        print("pairvol localcluster: starting the CSI driver ...", flush=True)
                        driver, running.csi = await _start_csi(cluster, namespaces[0], state_dir)
                    try:
                        status = running.status()
                        await control.write_state(state_dir, {k: status[k] for k in ("pid", "url", "kubeconfig")})
                        print(_banner(status, state_dir), flush=True)
                        await stop.wait()
                        print("pairvol localcluster: stopping", flush=True)
                    finally:
                        if driver is not None:  # unpublishes what pods still mount, before the nodes go
                            await driver.csi.close()
                    running.cluster = None
            finally:
                with contextlib.suppress(FileNotFoundError):
                    (state_dir / control.STATE).unlink()
                if own_kubeconfig:
                    with contextlib.suppress(FileNotFoundError):
                        kubeconfig.unlink()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(sig)
    print("pairvol localcluster: stopped", flush=True)
    return 0


def _detach(args: argparse.Namespace, state_dir: Path) -> int:
    """Start ``up`` in the background (its output in <state dir>/up.log), wait until ready."""
    argv = [sys.executable, "-m", "pairvol", *(["--verbose"] if args.verbose else []), "localcluster", "up"]
    argv += ["--state-dir", str(state_dir), "--nodes", str(args.nodes), "--host", args.host, "--port", str(args.port)]
    for flag, value in (("--kubeconfig", args.kubeconfig), ("--crds", args.crds), ("--nodes-root", args.nodes_root)):
        if value is not None:
            argv += [flag, str(value)]
    if args.simulate_nodes is not None:
        argv.append("--simulate-nodes" if args.simulate_nodes else "--no-simulate-nodes")
    if args.operator:
        argv.append("--operator")
    if args.csi:
        argv.append("--csi")
    for namespace in args.watch_namespace:
        argv += ["--watch-namespace", namespace]
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    log = state_dir / "up.log"
    with log.open("ab") as out:
        child = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True)
    deadline = time.monotonic() + (300 if args.operator else 120)
    while time.monotonic() < deadline:
        if child.poll() is not None:
            tail = log.read_text(errors="replace").strip().splitlines()[-5:]
            print(f"pairvol localcluster: up exited with status {child.returncode}:", file=sys.stderr)
            print("\n".join(f"  {line}" for line in tail), file=sys.stderr)
            return 1
        with contextlib.suppress(control.ControlError):
            status = asyncio.run(control.request(state_dir, {"op": "status"}, timeout=10))
            if status.get("pid") == child.pid and (state_dir / control.STATE).exists():
                print(_banner(status, state_dir))
                print(f"  (running in the background, pid {child.pid}; its log: {log})", flush=True)
                return 0
        time.sleep(0.3)
    child.terminate()
    print(f"pairvol localcluster: not ready within the time limit; see {log}", file=sys.stderr)
    return 1


# ----------------------------------------------------------------------------- the clients


def _print_status(status: dict[str, Any]) -> None:
    print(f"API server: {status['url']}   (pid {status['pid']})")
    print(f"kubeconfig: {status['kubeconfig']}")
    print(f"operator:   {status['operator']}")
    print(f"CSI driver: {status.get('csi', 'not running')}")
    if status.get("nodes_root"):
        print(f"node logs:  {status['nodes_root']}/<node>/logs/")
    rows = [("NODE", "READY", "STATE", "PODS")] + [
        (n["name"], n["ready"], n["state"], str(n["pods"])) for n in status["nodes"]
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


async def _down(state_dir: Path) -> int:
    answer = await control.request(state_dir, {"op": "down"})
    pid = int(answer["pid"])
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        except PermissionError:
            pass
        await asyncio.sleep(0.2)
    else:
        raise control.ControlError(f"the local cluster (pid {pid}) is still stopping after 90 s; see its output")
    print("pairvol localcluster: stopped")
    return 0


def run(args: argparse.Namespace) -> int:
    state_dir: Path = args.state_dir or control.default_state_dir()
    command = args.localcluster_command
    try:
        if command == "up":
            if args.detach:
                return _detach(args, state_dir)
            return asyncio.run(_up(args, state_dir))
        if command == "down":
            return asyncio.run(_down(state_dir))
        if command == "status":
            status = asyncio.run(control.request(state_dir, {"op": "status"}))
            if args.json:
                print(json.dumps(status))
            else:
                _print_status(status)
            return 0
        if command == "kubeconfig":
            print(asyncio.run(control.request(state_dir, {"op": "status"}))["kubeconfig"])
            return 0
        if command == "node":
            node = asyncio.run(control.request(state_dir, {"op": "node", "action": args.action, "node": args.node}))[
                "node"
            ]
            print(f"node {node['name']} {node['message']}")
            return 0
    except PairvolError as exc:
        print(f"pairvol localcluster: {exc}", file=sys.stderr)
        return 1
    return 2  # pragma: no cover - argparse enforces the choice
