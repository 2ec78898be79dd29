"""``pairvol csi``: the CSI driver ``pairvol.io``, one process per mode.

``--mode controller`` serves Identity and Controller (next to the external-provisioner
sidecar; it needs the Kubernetes API), ``--mode node`` serves Identity and Node (one per
node, privileged: it mounts, sets up loop devices and FUSE exports). Both listen on the
unix socket of ``--endpoint``, where the sidecars and the kubelet connect.

``pairvol csi attacher-host --socket PATH --state-dir DIR`` runs the attacher host next to
the node plugin (its own container of the node pod: pairvol.csi.attacher_host), which the
node plugin then asks for its attachers (``--attacher-host unix:///PATH``), so that they
survive restarts of the node plugin's container. It imports neither gRPC nor the
Kubernetes client.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import re
import signal
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

_NODE_ID = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]{0,251}[A-Za-z0-9])?$")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


def register(subparsers: Any) -> None:
    p: argparse.ArgumentParser = subparsers.add_parser(
        "csi", help="run the CSI driver pairvol.io (controller or node plugin)", description=__doc__
    )
    p.add_argument(
        "role",
        nargs="?",
        choices=("attacher-host",),
        help="attacher-host: run the node's attacher host instead of a CSI service (--socket, --state-dir)",
    )
    p.add_argument("--mode", choices=("controller", "node"), help="which CSI services to serve")
    p.add_argument("--endpoint", default="", help="unix:///PATH/csi.sock")
    p.add_argument("--socket", default="", help="attacher-host: the unix socket it listens on (its directory: 0700)")
    p.add_argument(
        "--attacher-host",
        default="",
        help="node: unix:///PATH of the attacher host that runs this node's attachers (default: the node plugin "
        "runs them itself, and they die with its container)",
    )
    p.add_argument(
        "--attach-transport",
        choices=("fuse", "nbd", "auto"),
        default="fuse",
        help="node: how a new attachment reaches the kernel: fuse (a FUSE export and a loop device; any node), "
        "nbd (the kernel's nbd client: needs the nbd module; such an attachment grows only when staged anew) "
        "or auto (nbd where the node has it, else fuse); an attachment keeps the transport it was made with",
    )
    p.add_argument(
        "--unstage-flush-timeout",
        type=float,
        default=120.0,
        metavar="SECONDS",
        help="node: how long NodeUnstageVolume waits for the device's flush to the volume's primary before it fails "
        "with nothing detached (the kubelet retries, and a retry waits for the same flush); default 120",
    )
    p.add_argument("--node-id", default="", help="this node's name (required with --mode node)")
    p.add_argument(
        "--state-dir",
        default="/var/lib/pairvol-csi",
        help="node: where attachments keep their records, keys and daemons (a hostPath)",
    )
    p.add_argument(
        "--kubeconfig",
        help="controller: kubeconfig file (default: $KUBECONFIG or in-cluster); node: optional, for the "
        "volumes' replication state in NodeGetVolumeStats (default: in-cluster if the pod has a token, else none)",
    )
    p.add_argument(
        "--volume-namespace",
        default="",
        help="controller: namespace of the ReplicatedVolumes it creates (default: the kubeconfig's or pod's)",
    )
    p.add_argument(
        "--ready-timeout",
        type=float,
        default=8.0,
        help="controller: seconds a CreateVolume waits for the volume to replicate before answering ABORTED "
        "(keep it below the provisioner's --timeout)",
    )
    p.set_defaults(run=run)


def _usage(args: argparse.Namespace) -> str | None:
    if args.role == "attacher-host":
        if args.mode or args.endpoint or args.attacher_host:
            return "attacher-host takes --socket and --state-dir only"
        if not args.socket.startswith("/") or not args.state_dir.startswith("/"):
            return f"--socket and --state-dir must be absolute paths, got {args.socket!r} and {args.state_dir!r}"
        return None
    if args.mode is None:
        return "--mode controller|node is required (or: pairvol csi attacher-host --socket PATH --state-dir DIR)"
    if args.socket:
        return "--socket is a flag of attacher-host"
    from pairvol.csi.attacher_host import socket_path as host_socket_path
    from pairvol.csi.server import socket_path

    if args.attacher_host:
        if args.mode != "node":
            return "--attacher-host is a flag of --mode node"
        try:
            host_socket_path(args.attacher_host)
        except ValueError as exc:
            return str(exc)
    try:
        socket_path(args.endpoint)
    except ValueError as exc:
        return str(exc)
    if args.mode == "node" and not _NODE_ID.match(args.node_id):
        return f"--node-id must name this node (a Kubernetes node name), got {args.node_id!r}"
    if args.mode == "node" and not args.state_dir.startswith("/"):
        return f"--state-dir must be an absolute path, got {args.state_dir!r}"
    if args.volume_namespace and not _DNS_LABEL.match(args.volume_namespace):
        return f"--volume-namespace must be a namespace name, got {args.volume_namespace!r}"
    if not 0 < args.unstage_flush_timeout <= 3600:
        return f"--unstage-flush-timeout must be more than 0 and at most 3600 seconds, got {args.unstage_flush_timeout}"
    if not 0 <= args.ready_timeout <= 3600:
        return f"--ready-timeout must be 0..3600 seconds, got {args.ready_timeout}"
    return None


def run(args: argparse.Namespace) -> int:
    problem = _usage(args)
    if problem is not None:
        log.error("bad flag: %s", problem)
        return 2
    if args.role == "attacher-host":
        from pairvol.csi.attacher_host import main

        return main(Path(args.socket), Path(args.state_dir))
    from pairvol.csi.attach import AttachError

    try:
        asyncio.run(_main(args))
    except KeyboardInterrupt:
        return 130
    except AttachError as exc:  # the attacher host never answered
        log.error("the node plugin cannot start: %s", exc)
        return 1
    return 0


async def _node_kube(args: argparse.Namespace, stack: contextlib.AsyncExitStack) -> Any:
    """The node plugin's optional cluster connection (read-only, the volumes' state): with
    --kubeconfig or $KUBECONFIG, or in a pod that was given a ServiceAccount token."""
    import os

    from pairvol.kube.client import KubeClient
    from pairvol.kube.config import SA_DIR, load_config

    in_cluster = bool(os.environ.get("KUBERNETES_SERVICE_HOST")) and await asyncio.to_thread(
        os.path.exists, f"{SA_DIR}/token"
    )
    if not (args.kubeconfig or os.environ.get("KUBECONFIG") or in_cluster):
        log.info("no cluster connection: the volume condition reports what this node sees, not the replication")
        return None
    config = await load_config(args.kubeconfig)
    return await stack.enter_async_context(KubeClient(config))


async def _main(args: argparse.Namespace) -> None:
    from pairvol.csi.identity import identity
    from pairvol.csi.proto import messages
    from pairvol.csi.server import serve, service

    await asyncio.to_thread(messages)  # compile csi.proto before the first call
    stack = contextlib.AsyncExitStack()
    async with stack:
        handlers = [service("Identity", identity(controller=args.mode == "controller", ready=lambda: True))]
        if args.mode == "controller":
            from pairvol.csi.controller import ControllerService
            from pairvol.kube.client import KubeClient
            from pairvol.kube.config import load_config

            config = await load_config(args.kubeconfig)
            kube = await stack.enter_async_context(KubeClient(config))
            controller = ControllerService(kube, args.volume_namespace or config.namespace, args.ready_timeout)
            handlers.append(service("Controller", controller.handlers()))
        else:
            from pairvol.csi.attacher_host import HostAttachers, socket_path
            from pairvol.csi.node import NodeService

            attachers = HostAttachers(socket_path(args.attacher_host)) if args.attacher_host else None
            if attachers is not None:
                await attachers.wait_ready()  # its answers say which attachers run
            node = NodeService(
                args.node_id,
                Path(args.state_dir),
                await _node_kube(args, stack),
                attachers,
                args.attach_transport,
                flush_wait_s=args.unstage_flush_timeout,
            )
            await node.recover()  # before the first call: what the state directory holds
            handlers.append(service("Node", node.handlers()))
        server = await serve(args.endpoint, handlers)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info("stopping the CSI driver (attachments stay in place)")
        await server.stop(grace=5)
