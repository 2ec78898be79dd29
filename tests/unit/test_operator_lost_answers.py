"""A pod create whose answer was lost, as a specification of the executor (handlers.py).

A create the API server applied but whose answer never reached the operator (its client
gave up waiting) must count as made: with a pod cache that lags, the next tick would
otherwise judge the new pod gone and place another replica — two agents of one volume on
one node, the same hostPath. A create that really failed is replaced as before.

Checked against the emulated API server (its pods are real objects there, listed and read
like on a real one): no kubelet, no agents; the agents' answers are stubbed, the plans are
made by the real planner.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from tests.support.operator_env import operator_against_the_api

from pairvol.api.status import VolumeStatus
from pairvol.kube.client import KubeClient, KubeError
from pairvol.kube.paths import pods_path, volume_path
from pairvol.operator import handlers
from pairvol.operator import manifests as m
from pairvol.operator.handlers import Caches, Reconciler
from pairvol.operator.informer import Informer

NS = "default"
PRIMARY_IP = "10.0.0.1"
NO_ANSWER = "no answer within 10.0s (is the API server reachable?)"


@pytest.fixture
async def kube() -> AsyncIterator[KubeClient]:
    async with operator_against_the_api({"n1": True, "n2": True, "n3": True}) as (_, client):
        yield client


def agent_pod(name: str, node: str, role: str) -> dict[str, Any]:
    labels = {"pairvol.io/volume": "vol", m.APP_LABEL: m.AGENT_APP, "pairvol.io/role": role}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": NS, "labels": labels},
            "spec": {"nodeName": node, "containers": [{"name": "agent", "image": "x"}]}}


async def degraded_volume_and_a_lagging_cache(k: KubeClient, monkeypatch: pytest.MonkeyPatch) -> Reconciler:
    """A volume whose primary vol-1 on n1 serves alone (so the next tick places a secondary),
    and a pod cache that was listed once and shows that primary only, whatever is created."""
    await k.create(volume_path(NS), {
        "apiVersion": "pairvol.io/v1alpha1", "kind": "ReplicatedVolume", "metadata": {"name": "vol", "namespace": NS},
        "spec": {"size": "64Mi"}})
    await k.merge_patch(volume_path(NS, "vol", status=True), {"status": {
        "phase": "Degraded", "epoch": 3, "endpoint": {"node": "n1"}, "dataNodes": ["n1"],
        "primary": {"node": "n1", "pod": "vol-1", "state": "primary/none", "address": PRIMARY_IP}}})
    await k.create(pods_path(NS), agent_pod("vol-1", "n1", "primary"))
    primary = await k.merge_patch(pods_path(NS, "vol-1") + "/status", {"status": {
        "phase": "Running", "podIP": PRIMARY_IP, "conditions": [{"type": "Ready", "status": "True"}]}})
    pods = Informer(k, pods_path(NS))
    pods.objects = {(NS, "vol-1"): primary}
    pods.synced.set()
    c = handlers.ctx()
    c.caches = Caches(nodes=Informer(k, "/api/v1/nodes"), volumes={}, pods={NS: pods}, leases={})

    async def status(address: str, token: str, timeout_s: float = 1.0) -> dict[str, Any]:
        if address.startswith(f"{PRIMARY_IP}:"):
            return {"role": "primary", "stage": "none", "epoch": 3, "export": {"serving": True},
                    "replication": {"state": "none"}}
        return {"role": "none", "stage": "none", "epoch": 0}

    monkeypatch.setattr(c.agents, "status", status)
    rec = Reconciler("vol", NS)
    rec.token, rec.infra_ok = "t", True  # the Secret and the Services are not what is tested
    return rec


def pod_creates_that(k: KubeClient, monkeypatch: pytest.MonkeyPatch, fate: Callable[[int], str]) -> list[str]:
    """Pod creates as a client that gives up waiting sees them: ``fate(n)`` of the n-th is
    ``"applied"`` (the API server made the pod; the answer is lost), ``"refused"`` (it never
    got the request) or ``"answered"``. Returns the names asked for, in order."""
    asked: list[str] = []
    real: Callable[[str, Any], Awaitable[dict[str, Any]]] = k.create

    async def create(path: str, body: Any) -> dict[str, Any]:
        if path != pods_path(NS):
            return await real(path, body)
        asked.append(body["metadata"]["name"])
        what = fate(len(asked) - 1)
        if what == "refused":
            raise KubeError(0, f"POST {path}: {NO_ANSWER}")
        out = await real(path, body)
        if what == "applied":
            raise KubeError(0, f"POST {path}: {NO_ANSWER}")
        return out

    monkeypatch.setattr(k, "create", create)
    return asked


async def ticks(rec: Reconciler, n: int) -> None:
    for _ in range(n):
        try:
            await rec.tick()
        except KubeError as exc:
            assert NO_ANSWER in str(exc)  # the lost answer fails its tick, nothing else does


async def on_server(k: KubeClient) -> list[tuple[str, str]]:
    return sorted((p["metadata"]["name"], p["spec"]["nodeName"]) for p in await k.list(pods_path(NS)))


async def stored(k: KubeClient) -> VolumeStatus:
    return VolumeStatus.from_dict((await k.get(volume_path(NS, "vol")))["status"])


async def test_a_pod_created_whose_answer_was_lost_is_not_replaced(
    kube: KubeClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    rec = await degraded_volume_and_a_lagging_cache(kube, monkeypatch)
    asked = pod_creates_that(kube, monkeypatch, lambda n: "applied")
    await ticks(rec, 4)
    # one secondary, created once; the status names it, and it waits for it to start
    assert asked == ["vol-4"]
    assert await on_server(kube) == [("vol-1", "n1"), ("vol-4", "n2")]
    st = await stored(kube)
    assert st.secondary is not None and st.secondary.pod == "vol-4"
    assert st.message == "waiting for secondary vol-4 to be ready"


async def test_a_pod_create_that_never_reached_the_api_server_is_replaced(
    kube: KubeClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    rec = await degraded_volume_and_a_lagging_cache(kube, monkeypatch)
    asked = pod_creates_that(kube, monkeypatch, lambda n: "refused" if n == 0 else "answered")
    await ticks(rec, 4)
    # the API server does not have vol-4: it is gone, and a new secondary is placed
    assert asked == ["vol-4", "vol-5"]
    assert await on_server(kube) == [("vol-1", "n1"), ("vol-5", "n2")]
    st = await stored(kube)
    assert st.secondary is not None and st.secondary.pod == "vol-5"
    assert rec.created == {"vol-5"}  # the cache has not shown it yet: read from the API server
