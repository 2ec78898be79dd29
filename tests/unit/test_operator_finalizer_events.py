"""A deletion that leaves data behind says so once per cause, not once per finalizer pass.

The finalizer passes every second while it waits for the wipe pods; what it cannot remove
(a node that is not ready, a directory holding another volume's data, a wipe that did not
succeed in time) is told as one Warning Event ``DataNotRemoved`` each, so that
``kubectl describe`` shows the causes, not a minute of repeats. A new volume of the same
name is another deletion, told again. The operator's finalizer against the emulated API
server: no kubelet runs the wipe pods.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from tests.support.operator_env import operator_against_the_api

from pairvol.kube.client import KubeClient
from pairvol.kube.paths import events_path, volume_path
from pairvol.operator.handlers import _finalize

NS = "default"


@pytest.fixture
async def kube() -> AsyncIterator[KubeClient]:
    """Nodes n1 and n2 ready, n3 not."""
    async with operator_against_the_api({"n1": True, "n2": True, "n3": False}) as (_, client):
        yield client


async def volume(k: KubeClient, name: str, host_path: str, status: dict[str, Any]) -> dict[str, Any]:
    await k.create(volume_path(NS), {
        "apiVersion": "pairvol.io/v1alpha1", "kind": "ReplicatedVolume", "metadata": {"name": name, "namespace": NS},
        "spec": {"size": "1Gi", "reclaimPolicy": "Delete", "storage": {"hostPath": host_path}}})
    return await k.merge_patch(volume_path(NS, name, status=True), {"status": status})


async def data_not_removed(k: KubeClient) -> list[str]:
    return sorted(e["message"] for e in await k.list(events_path(NS))
                  if e["involvedObject"]["name"] == "data" and e["reason"] == "DataNotRemoved")


async def test_each_reason_data_was_left_behind_is_told_once_per_deletion(kube: KubeClient) -> None:
    k = kube
    # data's replicas were on n1 (where inner, nested in data's directory, has its replica),
    # n2 (wiped) and n3 (not ready)
    status = {"dataNodes": ["n1", "n2", "n3"]}
    outer = await volume(k, "data", "/var/lib/pairvol", status)
    await volume(k, "inner", "/var/lib/pairvol/default/data/x", {
        "phase": "Degraded", "primary": {"node": "n1", "pod": "inner-1-a"}, "dataNodes": ["n1"]})

    for elapsed in (0.0, 1.0, 2.0, 3.0):  # the wipe on n2 has not finished yet
        waiting = await _finalize("data", NS, outer, outer["spec"], outer["status"], elapsed)
        assert waiting == "waiting for data cleanup pods"
    told = await data_not_removed(k)
    assert len(told) == 2, f"told again on later passes: {told}"
    assert told[0].startswith("data under /var/lib/pairvol/default/data on node n1 was not removed: it holds")
    assert told[1] == "node n3 is not ready; data under /var/lib/pairvol/default/data there was not removed"

    # the wipe did not succeed in time: told; the finalizer is done once the wipe is gone
    stopping = "waiting for the data cleanup pods to stop"  # no kubelet here confirms it
    assert await _finalize("data", NS, outer, outer["spec"], outer["status"], 61.0) == stopping
    assert await _finalize("data", NS, outer, outer["spec"], outer["status"], 91.0) is None
    (late,) = set(await data_not_removed(k)) - set(told)
    assert late.startswith("the cleanup pod ") and "did not succeed within 60 s" in late
    assert len(await data_not_removed(k)) == 3, "told again on the last pass"

    # the volume is gone; a new one of the same name, deleted in turn, is told about afresh
    await k.delete(volume_path(NS, "data"))
    again = await volume(k, "data", "/var/lib/pairvol", status)
    assert await _finalize("data", NS, again, again["spec"], again["status"], 0.0) == "waiting for data cleanup pods"
    assert len(await data_not_removed(k)) == 5
