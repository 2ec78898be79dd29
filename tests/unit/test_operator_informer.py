"""The operator's watch cache (informer.py) against the embedded API server: it holds what
the server holds, tells when a version has been shown, and survives a broken watch."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from pairvol.aio import bounded
from pairvol.kube.client import KubeClient, KubeError
from pairvol.kube.config import load_config
from pairvol.kube.paths import lease_path
from pairvol.localcluster.cluster import LocalCluster
from pairvol.operator import informer
from pairvol.operator.informer import Informer

pytestmark = pytest.mark.timeout(60)


def lease(name: str, holder: str) -> dict[str, Any]:
    return {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": name, "namespace": "default", "labels": {"app": "x" if holder else "y"}},
            "spec": {"holderIdentity": holder, "leaseDurationSeconds": 3}}  # fmt: skip


async def until(check: Callable[[], bool], within: float = 30.0) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not check():
        assert asyncio.get_running_loop().time() < deadline, "not within the time limit"
        await asyncio.sleep(0.02)


async def test_the_cache_follows_creations_updates_and_deletions_and_tells_the_listeners() -> None:
    async with LocalCluster(nodes=0) as cluster, KubeClient(await load_config(str(cluster.kubeconfig_path))) as kube:
        before = await kube.create(lease_path("default"), lease("before", "a"))
        inf = Informer(kube, lease_path("default"))
        events: list[tuple[str, str]] = []
        inf.subscribe(lambda etype, obj, prev: events.append((etype, obj["metadata"]["name"])))
        inf.start()
        try:
            await bounded(inf.synced.wait(), 5)
            assert inf.get("default", "before") is not None, "the first LIST fills the cache"
            assert inf.has_seen("default", "before", before["metadata"]["resourceVersion"])

            made = await kube.create(lease_path("default"), lease("made", "a"))
            await until(lambda: inf.get("default", "made") is not None)
            changed = await kube.merge_patch(lease_path("default", "made"), {"spec": {"holderIdentity": "b"}})
            rv = changed["metadata"]["resourceVersion"]
            await until(lambda: inf.has_seen("default", "made", rv))
            got = inf.get("default", "made")
            assert got is not None and got["spec"]["holderIdentity"] == "b"
            assert inf.has_seen("default", "made", made["metadata"]["resourceVersion"]), "older versions too"
            assert not inf.has_seen("default", "made", "999999")
            assert [o["metadata"]["name"] for o in inf.items(labels={"app": "x"})] == ["before", "made"]

            await kube.delete(lease_path("default", "made"))
            await until(lambda: inf.get("default", "made") is None)
            assert inf.has_seen("default", "made", rv), "seen, and gone since"
            assert events == [("ADDED", "before"), ("ADDED", "made"), ("MODIFIED", "made"), ("DELETED", "made")]
        finally:
            await inf.stop()


async def test_after_a_broken_watch_the_cache_catches_up_by_listing_again() -> None:
    async with LocalCluster(nodes=0) as cluster, KubeClient(await load_config(str(cluster.kubeconfig_path))) as kube:
        await kube.create(lease_path("default"), lease("old", "a"))
        inf = Informer(kube, lease_path("default"))
        inf.start()
        try:
            await bounded(inf.synced.wait(), 5)
            await until(lambda: len(cluster.api._kinds[("coordination.k8s.io", "leases")].watches) == 1)
            # the server drops the watch, and changes happen before the informer is back,
            # past the history a watch could resume from (as after etcd compaction)
            api, kind = cluster.api, cluster.api._kinds[("coordination.k8s.io", "leases")]
            for watch in kind.watches:
                watch.queue.put_nowait(None)
            api.delete_object(api.resource_type("coordination.k8s.io", "v1", "leases"), "default", "old")
            api.create_object("coordination.k8s.io", "v1", "leases", lease("new", "a"), "default")
            kind.compacted_rv = api._rv + 1
            await until(lambda: inf.get("default", "new") is not None and inf.get("default", "old") is None)
        finally:
            await inf.stop()


async def test_a_server_that_refuses_every_watch_is_not_listed_in_a_loop() -> None:
    async with LocalCluster(nodes=0) as cluster, KubeClient(await load_config(str(cluster.kubeconfig_path))) as kube:
        await kube.create(lease_path("default"), lease("only", "a"))
        kind = cluster.api._kinds[("coordination.k8s.io", "leases")]
        kind.compacted_rv = cluster.api._rv + 10**9  # every watch is answered 410 Gone
        inf = Informer(kube, lease_path("default"))
        lists = 0
        real_list = inf._list

        async def counted() -> None:
            nonlocal lists
            lists += 1
            await real_list()

        inf._list = counted  # type: ignore[method-assign]
        inf.start()
        try:
            await bounded(inf.synced.wait(), 5)
            await asyncio.sleep(1.0)
        finally:
            await bounded(inf.stop(), 10)  # and it stops
        assert inf.get("default", "only") is not None
        assert lists <= 1 / informer.RELIST_PAUSE_S + 1, f"{lists} LISTs in about a second"


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def test_a_shared_read_is_made_once_for_every_loop_that_asks_within_its_age() -> None:
    """Forty loops placing replicas at once cost the API server one LIST, not forty; a read
    older than the age is made again, and a read in flight is waited for, not repeated."""
    clock, gate = FakeClock(), asyncio.Event()
    answers = iter([[{"n": 1}], [{"n": 2}]])

    async def read() -> list[dict[str, Any]]:
        await gate.wait()
        return next(answers)

    shared = informer.SharedRead(read, max_age_s=0.5, clock=clock)
    waiting = [asyncio.create_task(shared.get()) for _ in range(40)]
    await asyncio.sleep(0)
    gate.set()
    assert [await w for w in waiting] == [[{"n": 1}]] * 40
    assert shared.requests == 1
    clock.now += 0.5  # counted from when the request was sent: still fresh
    assert await shared.get() == [{"n": 1}] and shared.requests == 1
    clock.now += 0.01
    assert await shared.get() == [{"n": 2}] and shared.requests == 2


async def test_a_failed_shared_read_reaches_every_waiter_and_is_asked_again() -> None:
    """An error is nobody's cached answer: all who waited get it, the next call reads anew.
    A waiter that is cancelled (its loop stopping) does not cancel the read for the others."""
    calls = 0
    gate = asyncio.Event()

    async def read() -> list[dict[str, Any]]:
        nonlocal calls
        calls += 1
        await gate.wait()
        if calls == 1:
            raise KubeError(503, "the API server is overloaded")
        return [{"ok": True}]

    shared = informer.SharedRead(read, max_age_s=0.5, clock=FakeClock())
    first, second, quitter = (asyncio.create_task(shared.get()) for _ in range(3))
    await asyncio.sleep(0)
    quitter.cancel()
    gate.set()
    for waiter in (first, second):
        with pytest.raises(KubeError, match="overloaded"):
            await waiter
    assert await shared.get() == [{"ok": True}] and calls == 2
