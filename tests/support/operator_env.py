"""The operator's executor against the emulated API server, for tests of handlers.py.

The local cluster's API server (no kubelet, no controllers) with the given nodes, and the
operator's process context (``handlers.ctx()``) holding a client of it: what a Reconciler's
reads, writes and Events go through. No watch caches, so every read goes to the API server.
The previous context is restored afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping

from pairvol.aio import bounded
from pairvol.kube.client import KubeClient
from pairvol.kube.config import load_config
from pairvol.localcluster.cluster import LocalCluster, node_object
from pairvol.operator import handlers
from pairvol.operator.agentclient import AgentClient
from pairvol.operator.handlers import Context
from pairvol.operator.manifests import OperatorConfig
from pairvol.operator.metrics import OperatorMetrics


@contextlib.asynccontextmanager
async def operator_against_the_api(
    nodes: Mapping[str, bool] | None = None,
) -> AsyncIterator[tuple[LocalCluster, KubeClient]]:
    """``nodes``: name -> Ready."""
    async with LocalCluster(nodes=0, controllers=False) as cluster, \
            KubeClient(await load_config(str(cluster.kubeconfig_path))) as client:
        for name, ready in (nodes or {}).items():
            cluster.api.create_object("", "v1", "nodes", node_object(name, ready=ready))
        agents = AgentClient()
        saved = handlers._CTX
        handlers._CTX = Context(config=OperatorConfig(), kube=client, agents=agents, metrics=OperatorMetrics())
        try:
            yield cluster, client
        finally:
            handlers._CTX = saved
            await agents.close()


class DaemonStop:
    """What kopf hands a daemon: true once the daemon is to stop; ``wait`` sleeps until then."""

    def __init__(self) -> None:
        self.flag = asyncio.Event()

    def __bool__(self) -> bool:
        return self.flag.is_set()

    async def wait(self, timeout: float) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await bounded(self.flag.wait(), timeout)
