"""``pairvol operator``: run the kopf operator (handlers in :mod:`pairvol.operator.handlers`).

Settings come from the environment (PAIRVOL_*; see docs/configuration.md and
:class:`pairvol.operator.manifests.OperatorConfig`); the flags here override the ones a
developer changes most when running the operator by hand against a local cluster.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
from typing import Any

from pairvol.operator.manifests import ConfigError, OperatorConfig

log = logging.getLogger(__name__)


def register(subparsers: Any) -> None:
    p: argparse.ArgumentParser = subparsers.add_parser(
        "operator", help="run the ReplicatedVolume operator (kopf)", description=__doc__
    )
    p.add_argument("--kubeconfig", help="kubeconfig file (default: $KUBECONFIG or in-cluster)")
    p.add_argument(
        "--namespace",
        action="append",
        default=[],
        help="watch only this namespace (repeatable; default: $PAIRVOL_WATCH_NAMESPACES or all namespaces)",
    )
    p.add_argument(
        "--peering",
        default=None,
        help="kopf peering name: replicas with the same name never act at once "
        "(default: $PAIRVOL_PEERING; empty = standalone)",
    )
    p.add_argument(
        "--liveness",
        default=None,
        help="kopf liveness endpoint, e.g. http://0.0.0.0:8081/healthz (default: on $PAIRVOL_OPERATOR_HEALTH_PORT)",
    )
    p.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        help="port for /metrics (default $PAIRVOL_OPERATOR_METRICS_PORT or 8080, 0 = off)",
    )
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.kubeconfig:
        os.environ["KUBECONFIG"] = args.kubeconfig
    if args.metrics_port is not None:
        os.environ["PAIRVOL_OPERATOR_METRICS_PORT"] = str(args.metrics_port)
    if args.peering is not None:
        os.environ["PAIRVOL_PEERING"] = args.peering
    if args.namespace:
        os.environ["PAIRVOL_WATCH_NAMESPACES"] = ",".join(args.namespace)
    try:
        config = OperatorConfig.from_env()
    except ConfigError as exc:
        log.error("bad operator setting: %s", exc)
        return 2

    import kopf  # imported late: the agent and the CLI's --help never pay for kopf

    from pairvol.operator import handlers  # registers the handlers with kopf

    del handlers
    liveness = args.liveness
    if liveness is None and config.health_port:
        liveness = f"http://0.0.0.0:{config.health_port}/healthz"
    namespaces = list(config.watch_namespaces)
    try:
        asyncio.run(
            kopf.operator(
                clusterwide=not namespaces,
                namespaces=namespaces,
                standalone=not config.peering,
                peering_name=config.peering or None,
                priority=config.peering_priority,
                liveness_endpoint=liveness or None,
            )
        )
    except KeyboardInterrupt:
        return 130
    return 0
