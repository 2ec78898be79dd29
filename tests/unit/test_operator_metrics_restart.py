"""The operator's per-volume metrics say what the volume's status says, also after a restart.

A restarted operator (or the replica that becomes leader) plans every volume afresh; for a
volume stuck where it is — Failed with its failover target lost, Degraded while a node is
down — the plan is the status already stored, so nothing is written. Its
``pairvol_volume_phase`` and checkpoint time must be exported all the same: the alerts on
Failed and Degraded volumes read them. And a loop that stops (the volume is no longer this
replica's) takes its volume's series with it, so a replica that lost the lead does not
export an old value next to the new leader's. Checked against the emulated API server: no
kubelet, no agents; the plans are made by the real planner.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from tests.support.operator_env import DaemonStop
from tests.unit.test_operator_decisions import NOW, _in_flight

from pairvol.aio import bounded
from pairvol.api.spec import SpecError, parse_spec
from pairvol.api.status import Phase, VolumeStatus, parse_time
from pairvol.kube.client import KubeClient
from pairvol.kube.config import load_config
from pairvol.kube.paths import volume_path
from pairvol.localcluster.cluster import LocalCluster, node_object
from pairvol.operator import handlers
from pairvol.operator.agentclient import AgentClient
from pairvol.operator.handlers import Context, Reconciler
from pairvol.operator.manifests import OperatorConfig
from pairvol.operator.metrics import OperatorMetrics

NS = "default"


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


def operator_process(kube: KubeClient, agents: AgentClient) -> OperatorMetrics:
    """A (re)started operator process: its own, empty metrics."""
    metrics = OperatorMetrics()
    handlers._CTX = Context(config=OperatorConfig(), kube=kube, agents=agents, metrics=metrics)
    return metrics


@pytest.fixture
async def agents() -> AsyncIterator[AgentClient]:
    client = AgentClient()
    try:
        yield client
    finally:
        await client.close()


@pytest.fixture
async def kube() -> AsyncIterator[KubeClient]:
    """Node n1 ready, n2 (the failover target's) down; no pods."""
    async with LocalCluster(nodes=0, controllers=False) as cluster, \
            KubeClient(await load_config(str(cluster.kubeconfig_path))) as client:
        cluster.api.create_object("", "v1", "nodes", node_object("n1"))
        cluster.api.create_object("", "v1", "nodes", node_object("n2", ready=False))
        saved = handlers._CTX
        try:
            yield client
        finally:
            handlers._CTX = saved


async def failover_in_flight(k: KubeClient) -> None:
    """A failover from vol-1-a on n1 to vol-1-b on n2 was stored; then n2 went down."""
    await k.create(volume_path(NS), {
        "apiVersion": "pairvol.io/v1alpha1", "kind": "ReplicatedVolume", "metadata": {"name": "vol", "namespace": NS},
        "spec": {"size": "64Mi"}})
    await k.merge_patch(volume_path(NS, "vol", status=True), {"status": _in_flight().status.to_dict()})


async def stored_status(k: KubeClient) -> VolumeStatus:
    return VolumeStatus.from_dict((await k.get(volume_path(NS, "vol")))["status"])


async def test_a_restarted_operator_exports_the_phase_of_a_volume_whose_status_does_not_change(
    kube: KubeClient, agents: AgentClient,
) -> None:
    """The target is lost and may have served: the volume is Failed (FailoverTargetLost) until
    n2 comes back. A restarted operator's first tick writes nothing, and exports Failed."""
    await failover_in_flight(kube)
    before = operator_process(kube, agents)
    await Reconciler("vol", NS).tick()
    failed = await stored_status(kube)
    assert failed.phase is Phase.FAILED and "did not finish" in failed.message
    assert sample(before.registry, "pairvol_volume_phase", namespace=NS, volume="vol", phase="Failed") == 1

    after = operator_process(kube, agents)  # restarted, or another replica now leads
    await Reconciler("vol", NS).tick()
    assert await stored_status(kube) == failed
    assert sample(after.registry, "pairvol_operator_status_writes_total") == 0, "nothing to write"
    assert sample(after.registry, "pairvol_volume_phase", namespace=NS, volume="vol", phase="Failed") == 1
    assert sample(after.registry, "pairvol_volume_phase", namespace=NS, volume="vol", phase="Replicating") == 0
    assert sample(after.registry, "pairvol_operator_volumes", phase="Failed") == 1
    checkpoint = failed.checkpoint or {}
    assert parse_time(checkpoint.get("time")) == NOW - 2
    assert sample(
        after.registry, "pairvol_operator_last_checkpoint_timestamp_seconds", namespace=NS, volume="vol"
    ) == NOW - 2
    # what PairvolCheckpointStale measures the age against: the spec's (defaulted) interval
    assert sample(after.registry, "pairvol_volume_checkpoint_interval_seconds", namespace=NS, volume="vol") == 10


async def test_a_loop_that_stops_takes_its_volumes_series_with_it(kube: KubeClient, agents: AgentClient) -> None:
    """A replica that is no longer leader stops its loops; the new leader exports the
    volume's phase and checkpoint time. The old one must export neither any more."""
    await failover_in_flight(kube)
    metrics = operator_process(kube, agents)
    stop = DaemonStop()
    loop = asyncio.create_task(Reconciler("vol", NS).run(stop))
    labels: dict[str, Any] = {"namespace": NS, "volume": "vol"}
    for _ in range(500):
        if sample(metrics.registry, "pairvol_operator_last_checkpoint_timestamp_seconds", **labels) is not None:
            break
        await asyncio.sleep(0.01)
    assert sample(metrics.registry, "pairvol_volume_phase", phase="Failed", **labels) == 1
    assert sample(metrics.registry, "pairvol_operator_last_checkpoint_timestamp_seconds", **labels) == NOW - 2
    stop.flag.set()
    await bounded(loop, 10)
    assert sample(metrics.registry, "pairvol_volume_phase", phase="Failed", **labels) is None
    assert sample(metrics.registry, "pairvol_operator_volumes", phase="Failed") == 0
    assert sample(metrics.registry, "pairvol_operator_last_checkpoint_timestamp_seconds", **labels) is None
    assert sample(metrics.registry, "pairvol_volume_checkpoint_interval_seconds", **labels) is None


@pytest.mark.parametrize(
    ("spec", "exported"),
    [
        ({"size": "1Gi"}, 10),  # as the CRD defaults it
        ({"size": "1Gi", "checkpoint": {"intervalSeconds": 0}}, 0),  # checkpoints only on request: never stale
        ({"size": "1Gi", "checkpoint": {"intervalSeconds": 45}}, 45),
        ({"size": "1Gi", "checkpoint": {"intervalSeconds": -1}}, None),  # no valid spec has it: no series
        ({"size": "1Gi", "checkpoint": {"intervalSeconds": True}}, None),
        ({"size": "1Gi", "checkpoint": "often"}, None),
    ],
)
def test_the_interval_exported_for_the_staleness_alert_is_the_specs(spec: dict[str, Any], exported: int | None) -> None:
    # the tick exports the interval of the spec it planned from; an invalid spec exports none
    try:
        interval: int | None = parse_spec(spec, name="vol").checkpoint_interval_s
    except SpecError:
        interval = None
    assert interval == exported
