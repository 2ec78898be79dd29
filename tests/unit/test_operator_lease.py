"""LeaseKeeper against the emulated API server: the agent-side fence of DESIGN.md §4."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace
from typing import Any

import pytest

from pairvol.agent.lease import (
    OUT_OF_SYNC_ANNOTATION,
    LeaseError,
    LeaseKeeper,
    attach_lease,
    parse_micro_time,
)
from pairvol.localcluster.cluster import LocalCluster
from pairvol.operator.k8s import KubeClient, lease_path, load_config

pytestmark = pytest.mark.timeout(60)


class Lost:
    def __init__(self) -> None:
        self.at: float | None = None

    async def __call__(self) -> None:
        self.at = time.time()


def keeper(cluster: LocalCluster, holder: str, lost: Lost, duration: float = 2.0) -> LeaseKeeper:
    return LeaseKeeper(namespace="default", name="pairvol-vol", holder=holder,
                       duration_s=duration, kubeconfig=str(cluster.kubeconfig_path), on_lost=lost)


async def read_lease(cluster: LocalCluster) -> dict[str, object]:
    async with KubeClient(await load_config(str(cluster.kubeconfig_path))) as kube:
        return await kube.get(lease_path("default", "pairvol-vol"))


async def test_acquire_creates_the_lease_and_renewals_keep_it_fresh() -> None:
    async with LocalCluster(nodes=0) as cluster:
        k = keeper(cluster, "pod-a", Lost())
        await k.acquire(5)
        assert k.held
        lease = await read_lease(cluster)
        spec = lease["spec"]
        assert isinstance(spec, dict)
        assert spec["holderIdentity"] == "pod-a" and spec["leaseDurationSeconds"] == 2
        first = parse_micro_time(spec["renewTime"])
        task = asyncio.create_task(k.run())
        await asyncio.sleep(1.5)
        spec2 = (await read_lease(cluster))["spec"]
        assert isinstance(spec2, dict)
        assert first is not None and (parse_micro_time(spec2["renewTime"]) or 0) > first
        assert k.held and not task.done()
        task.cancel()
        await k.release()
        spec3 = (await read_lease(cluster))["spec"]
        assert isinstance(spec3, dict) and not spec3.get("holderIdentity")


async def test_a_second_holder_waits_until_expiry_then_takes_over() -> None:
    async with LocalCluster(nodes=0) as cluster:
        a = keeper(cluster, "pod-a", Lost())
        await a.acquire(5)
        b = keeper(cluster, "pod-b", Lost())
        with pytest.raises(LeaseError, match="held by pod-a"):
            await b.acquire(0.5)
        # a never renews (as if dead): b gets it once the 2 s have passed, not before
        t0 = time.monotonic()
        await b.acquire(5)
        assert time.monotonic() - t0 >= 0.9
        spec = (await read_lease(cluster))["spec"]
        assert isinstance(spec, dict)
        assert spec["holderIdentity"] == "pod-b" and spec["leaseTransitions"] == 1
        # a finds out at its next renewal and reports the loss
        lost = Lost()
        a.on_lost = lost
        await asyncio.wait_for(a.run(), 5)
        assert lost.at is not None and not a.held
        await b.release()


async def test_unreachable_api_server_means_lost_before_the_lease_expires() -> None:
    lost = Lost()
    async with LocalCluster(nodes=0) as cluster:
        k = keeper(cluster, "pod-a", lost)
        await k.acquire(5)
        renewed = parse_micro_time((await read_lease(cluster))["spec"]["renewTime"])  # type: ignore[index]
        task = asyncio.create_task(k.run())
        await asyncio.sleep(0.8)  # one renewal happens
        renewed = parse_micro_time((await read_lease(cluster))["spec"]["renewTime"])  # type: ignore[index]
    # the API server is gone now: renewals fail
    await asyncio.wait_for(task, 5)
    assert lost.at is not None and renewed is not None
    assert lost.at < renewed + 2.0, "on_lost must run before others may consider it expired"
    assert not k.held
    await k.release()


async def test_out_of_sync_mark_is_stored_on_the_lease() -> None:
    async with LocalCluster(nodes=0) as cluster:
        k = keeper(cluster, "pod-a", Lost())
        await k.acquire(5)
        await k.mark_out_of_sync(7)
        meta = (await read_lease(cluster))["metadata"]
        assert isinstance(meta, dict)
        assert meta["annotations"][OUT_OF_SYNC_ANNOTATION] == "7"
        await k.release()
        with pytest.raises(LeaseError, match="not held"):
            await k.mark_out_of_sync(8)


async def test_a_lease_not_renewed_in_time_is_not_held_and_takes_no_out_of_sync_mark() -> None:
    """The lost-mark path: once the keeper's own validity ran out (no renewal, e.g. the
    renewer is stuck), it no longer claims the lease, and an out-of-sync mark is refused
    at once (the agent then must not acknowledge) instead of being written by a holder that
    others may already consider gone."""
    async with LocalCluster(nodes=0) as cluster:
        k = keeper(cluster, "pod-a", Lost(), duration=1.0)
        await k.acquire(5)
        assert k.held
        await asyncio.sleep(1.0 - k.safety_s + 0.1)  # validity: duration minus the safety margin
        assert not k.held
        with pytest.raises(LeaseError, match="cannot mark out-of-sync at epoch 3: lease pairvol-vol not held"):
            await asyncio.wait_for(k.mark_out_of_sync(3), 5)
        meta = (await read_lease(cluster))["metadata"]
        assert isinstance(meta, dict)
        assert OUT_OF_SYNC_ANNOTATION not in (meta.get("annotations") or {})
        await k.release()


async def test_a_keeper_that_finds_its_lease_taken_over_stops_and_does_not_overwrite_it() -> None:
    """Within its validity, a renewal that finds another holder reports the loss at once and
    leaves the other holder's Lease alone (it may be the promoted primary's)."""
    lost = Lost()
    async with LocalCluster(nodes=0) as cluster:
        k = keeper(cluster, "pod-a", lost, duration=3.0)
        await k.acquire(5)
        task = asyncio.create_task(k.run())
        async with KubeClient(await load_config(str(cluster.kubeconfig_path))) as kube:
            lease = await kube.get(lease_path("default", "pairvol-vol"))
            lease["spec"]["holderIdentity"] = "pod-b"
            await kube.replace(lease_path("default", "pairvol-vol"), lease)
        await asyncio.wait_for(task, 3)  # one renewal period (1 s) and a bit
        assert lost.at is not None and not k.held
        spec = (await read_lease(cluster))["spec"]
        assert isinstance(spec, dict) and spec["holderIdentity"] == "pod-b"
        await k.release()  # not held any more: only closes the client
        assert (await read_lease(cluster))["spec"]["holderIdentity"] == "pod-b"  # type: ignore[index]


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(LeaseError, match="at least 1 second"):
        LeaseKeeper(namespace="d", name="n", holder="h", duration_s=0.5, kubeconfig=None,
                    on_lost=Lost())
    with pytest.raises(LeaseError, match="POD_NAME"):
        LeaseKeeper(namespace="d", name="n", holder="", duration_s=2, kubeconfig=None,
                    on_lost=Lost())


class FakeReplica:
    """The three things attach_lease uses from the agent's Replica, observable by the test."""

    def __init__(self) -> None:
        self.out_of_sync_hooks: list[Any] = []
        self.serving = False
        self.state = SimpleNamespace(role="none", epoch=1)
        self.fenced: list[str] = []

    async def fence_workload(self, reason: str) -> None:
        self.fenced.append(reason)
        self.serving = False


async def test_attach_lease_holds_while_serving_and_fences_when_the_api_is_lost(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("POD_NAME", "vol-3-a")
    replica = FakeReplica()
    args = SimpleNamespace(lease_namespace="default", lease_name="pairvol-vol", lease_duration=2.0)
    async with LocalCluster(nodes=0) as cluster:
        monkeypatch.setenv("KUBECONFIG", str(cluster.kubeconfig_path))
        task = await attach_lease(replica, args)
        await asyncio.sleep(0.3)
        async with KubeClient(await load_config(str(cluster.kubeconfig_path))) as kube:
            assert await kube.get_or_none(lease_path("default", "pairvol-vol")) is None
            replica.state = SimpleNamespace(role="primary", epoch=2)
            replica.serving = True
            for _ in range(50):
                lease = await kube.get_or_none(lease_path("default", "pairvol-vol"))
                if lease is not None:
                    break
                await asyncio.sleep(0.1)
            assert lease is not None and lease["spec"]["holderIdentity"] == "vol-3-a"
        # out-of-sync marks go to the Lease through the replica's hook
        await replica.out_of_sync_hooks[0](2)
        meta = (await read_lease(cluster))["metadata"]
        assert isinstance(meta, dict) and meta["annotations"][OUT_OF_SYNC_ANNOTATION] == "2"
        renewed = parse_micro_time((await read_lease(cluster))["spec"]["renewTime"])  # type: ignore[index]
    # API server gone: the export is fenced before the lease would have expired
    for _ in range(50):
        if replica.fenced:
            break
        await asyncio.sleep(0.1)
    assert replica.fenced and "lease lost" in replica.fenced[0]
    assert renewed is not None and time.time() < renewed + 2.0 + 0.5
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_a_primary_shutting_down_stops_serving_before_it_releases_the_lease(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Releasing the Lease lets the operator promote at once, so the export must be fenced
    first: when the keeper is cancelled, the fence comes before the release."""
    monkeypatch.setenv("POD_NAME", "vol-3-a")
    replica = FakeReplica()
    args = SimpleNamespace(lease_namespace="default", lease_name="pairvol-vol", lease_duration=2.0)
    async with LocalCluster(nodes=0) as cluster:
        monkeypatch.setenv("KUBECONFIG", str(cluster.kubeconfig_path))
        task = await attach_lease(replica, args)
        replica.state = SimpleNamespace(role="primary", epoch=2)
        replica.serving = True
        holders: list[object] = []

        async def fence(reason: str) -> None:  # what the Lease says when the fence happens
            holders.append((await read_lease(cluster))["spec"]["holderIdentity"])  # type: ignore[index]
            replica.fenced.append(reason)
            replica.serving = False

        replica.fence_workload = fence  # type: ignore[method-assign]
        async with KubeClient(await load_config(str(cluster.kubeconfig_path))) as kube:
            for _ in range(50):
                lease = await kube.get_or_none(lease_path("default", "pairvol-vol"))
                if lease is not None and lease["spec"].get("holderIdentity") == "vol-3-a":
                    break
                await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert replica.fenced == ["agent shutting down"]
        assert holders == ["vol-3-a"], "fenced while still holding the lease"
        spec = (await read_lease(cluster))["spec"]
        assert isinstance(spec, dict) and not spec.get("holderIdentity"), "released after the fence"
