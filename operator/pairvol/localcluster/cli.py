"""``pairvol localcluster up``: run the emulated cluster in the foreground.

Why a command: developers poke at the operator with ``kubectl`` while it runs; this starts
the emulated API server with our CRDs and N nodes (simulated by the node simulator when
run as root, else plain Ready Node objects), writes a kubeconfig, prints how to use it and
runs until SIGINT/SIGTERM. kubectl works against it: apply (client- and server-side),
get/-w, describe, explain, wait, logs, delete.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from pathlib import Path

from pairvol.errors import PairvolError

logger = logging.getLogger(__name__)


class LocalClusterCLIError(PairvolError):
    """The command line asked for something this machine cannot do."""


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "localcluster",
        help="emulated Kubernetes API + nodes for demos and tests",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="localcluster_command", required=True, metavar="ACTION")
    up = sub.add_parser("up", help="start the local cluster and run until interrupted")
    up.add_argument("--nodes", type=int, default=3, help="number of nodes (default 3)")
    up.add_argument("--host", default="127.0.0.1", help="API server address (default 127.0.0.1)")
    up.add_argument("--port", type=int, default=0, help="API server port (default 0: a free one)")
    up.add_argument(
        "--kubeconfig",
        type=Path,
        default=None,
        help="where to write the kubeconfig (default: a temp dir, removed at exit)",
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
    up.set_defaults(run=run)


async def _up(args: argparse.Namespace) -> int:
    from pairvol.localcluster.cluster import LocalCluster

    simulate = args.simulate_nodes if args.simulate_nodes is not None else os.geteuid() == 0
    if simulate and os.geteuid() != 0:
        raise LocalClusterCLIError(
            "--simulate-nodes needs root (network namespaces, cgroups); run as root or pass "
            "--no-simulate-nodes for plain Ready Node objects"
        )
    if not args.verbose:  # one access-log line per request drowns the useful output
        logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        async with LocalCluster(
            args.nodes,
            host=args.host,
            port=args.port,
            kubeconfig=args.kubeconfig,
            crds_dir=args.crds,
            simulate_nodes=simulate,
            nodes_root=args.nodes_root,
        ) as cluster:
            kind = "simulated (pods run as processes)" if simulate else "Ready objects only"
            print(
                f"pairvol localcluster: API server {cluster.url}, nodes ({kind}): "
                f"{', '.join(cluster.node_names) or '(none)'}"
            )
            print(f"kubeconfig: {cluster.kubeconfig_path}")
            print(f"export KUBECONFIG={cluster.kubeconfig_path}", flush=True)
            await stop.wait()
            print("pairvol localcluster: stopping", flush=True)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(sig)
    return 0


def run(args: argparse.Namespace) -> int:
    if args.localcluster_command != "up":  # pragma: no cover - argparse enforces the choice
        return 2
    try:
        return asyncio.run(_up(args))
    except PairvolError as exc:
        print(f"pairvol localcluster: {exc}", file=sys.stderr)
        return 1
