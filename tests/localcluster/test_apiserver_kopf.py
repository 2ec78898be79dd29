"""A real kopf operator runs against the emulated API server.

kopf is the operator framework pairvol uses; this proves the server's discovery, list +
watch streams, merge patches of the main resource and of /status, finalizers and
events are what kopf expects — with a tiny operator, in-process, logging in through the
kubeconfig that LocalCluster writes.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import kopf
import pytest

from pairvol.localcluster.cluster import LocalCluster

RVS = "/apis/pairvol.io/v1alpha1/namespaces/default/replicatedvolumes"
MERGE = {"Content-Type": "application/merge-patch+json"}
RES = ("pairvol.io", "v1alpha1", "replicatedvolumes")


def build_registry(seen: list[str]) -> kopf.OperatorRegistry:
    registry = kopf.OperatorRegistry()

    @kopf.on.login(registry=registry)
    def login(**kwargs: Any) -> Any:
        # kopf's own kubeconfig reader (the kubernetes client reads $KUBECONFIG at import
        # time, too early for a per-test file; a subprocess operator has no such problem).
        return kopf.login_with_kubeconfig(**kwargs)

    @kopf.on.create(*RES, registry=registry)
    def created(name: str, spec: Any, patch: Any, body: Any, **_: Any) -> None:
        seen.append(f"create {name} {spec['size']}")
        kopf.info(body, reason="Accepted", message=f"volume of {spec['size']} accepted")
        patch.status["phase"] = "Pending"
        patch.status["observedGeneration"] = 1

    @kopf.on.field(*RES, field="spec.failover.mode", registry=registry)
    def mode_changed(old: Any, new: Any, patch: Any, body: Any, **_: Any) -> None:
        if old is None:
            return
        seen.append(f"mode {old}->{new}")
        patch.status["message"] = f"failover mode is now {new}"
        patch.status["observedGeneration"] = body["metadata"]["generation"]

    @kopf.on.delete(*RES, registry=registry)
    def deleted(name: str, **_: Any) -> None:
        seen.append(f"delete {name}")

    return registry


@pytest.fixture
async def kopf_operator(api_cluster: LocalCluster, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[list[str]]:
    """Run a tiny kopf operator until the test ends; yield the handler log.

    kopf cancels every task that appears in its loop while it runs, so (as kopf's docs
    advise for embedding) it gets its own thread and event loop; the flags are
    thread-safe events.
    """
    monkeypatch.setenv("KUBECONFIG", str(api_cluster.kubeconfig_path))
    seen: list[str] = []
    settings = kopf.OperatorSettings()
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage()
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage()
    settings.watching.server_timeout = 10
    ready, stop = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            asyncio.run(
                kopf.operator(
                    registry=build_registry(seen),
                    settings=settings,
                    clusterwide=False,
                    namespaces=["default"],
                    standalone=True,
                    ready_flag=ready,
                    stop_flag=stop,
                )
            )
        except BaseException as exc:  # reported by the fixture, not lost in the thread
            errors.append(exc)

    thread = threading.Thread(target=run, name=f"kopf-{os.getpid()}", daemon=True)
    thread.start()
    try:
        assert await asyncio.to_thread(ready.wait, 20), f"kopf did not start: {errors}"
        yield seen
    finally:
        stop.set()
        await asyncio.to_thread(thread.join, 20)
        assert not thread.is_alive(), "kopf did not stop within 20s"
    assert not errors, errors


async def eventually(check: Callable[[], Any], within: float = 20) -> Any:
    deadline = asyncio.get_running_loop().time() + within
    while True:
        result = check()
        if result:
            return result
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {within}s")
        await asyncio.sleep(0.1)


async def test_kopf_handles_create_field_change_and_delete_with_finalizer(
    kopf_operator: list[str], api_cluster: LocalCluster, api_http: aiohttp.ClientSession
) -> None:
    seen = kopf_operator
    rtype = api_cluster.api.resource_type(*RES)

    def current() -> dict[str, Any] | None:
        objs = api_cluster.api.list_objects(rtype, "default")
        return objs[0] if objs else None

    body = {
        "apiVersion": "pairvol.io/v1alpha1",
        "kind": "ReplicatedVolume",
        "metadata": {"name": "vol"},
        "spec": {"size": "64Mi"},
    }
    async with api_http.post(RVS, json=body) as resp:
        assert resp.status == 201

    obj = await eventually(lambda: (o := current()) and o.get("status", {}).get("phase") and o)
    assert obj["status"] == {"phase": "Pending", "observedGeneration": 1}
    assert "create vol 64Mi" in seen
    # kopf put its finalizer on the object because it has a delete handler.
    assert obj["metadata"]["finalizers"]

    # kopf posts Kubernetes events about the object to the core v1 API.
    events = api_cluster.api.resource_type("", "v1", "events")
    event = await eventually(
        lambda: [e for e in api_cluster.api.list_objects(events, "default") if e["reason"] == "Accepted"]
    )
    assert event[0]["involvedObject"]["name"] == "vol"
    assert event[0]["message"] == "volume of 64Mi accepted"

    async with api_http.patch(f"{RVS}/vol", json={"spec": {"failover": {"mode": "Latest"}}}, headers=MERGE) as resp:
        assert resp.status == 200
    obj = await eventually(lambda: (o := current()) and "message" in o.get("status", {}) and o)
    assert obj["status"]["message"] == "failover mode is now Latest"
    assert obj["status"]["observedGeneration"] == obj["metadata"]["generation"] == 2
    assert "mode Checkpoint->Latest" in seen

    async with api_http.delete(f"{RVS}/vol") as resp:
        assert resp.status == 200
    await eventually(lambda: current() is None)
    assert "delete vol" in seen
