"""Watches of the emulated API server, and the ``kubernetes`` client against it.

Watches are how kopf and the node simulator learn about changes, so the stream format,
resourceVersion replay, selector transitions, timeouts and 410 Gone must match Kubernetes.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import kubernetes

from pairvol.aio import bounded
from pairvol.localcluster.apiserver import APIServer, serve
from pairvol.localcluster.cluster import LocalCluster

PODS = "/api/v1/namespaces/default/pods"
MERGE = {"Content-Type": "application/merge-patch+json"}


def pod(name: str, **labels: str) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "labels": labels},
        "spec": {"nodeName": "node-1", "containers": [{"name": "c", "image": "i"}]},
    }


async def read_events(resp: aiohttp.ClientResponse, count: int) -> list[tuple[str, str]]:
    """(type, name) of the next ``count`` events of a watch stream."""
    events: list[tuple[str, str]] = []
    while len(events) < count:
        line = await bounded(resp.content.readline(), 5)
        assert line, f"stream ended after {events}"
        event = json.loads(line)
        if event["type"] != "BOOKMARK":
            events.append((event["type"], event["object"]["metadata"].get("name", "")))
    return events


async def test_watch_without_version_lists_then_streams_changes(
    api_http: aiohttp.ClientSession,
) -> None:
    await api_http.post(PODS, json=pod("a"))
    async with api_http.get(PODS, params={"watch": "true"}) as resp:
        assert resp.status == 200
        assert await read_events(resp, 1) == [("ADDED", "a")]
        await api_http.patch(f"{PODS}/a", json={"metadata": {"labels": {"x": "1"}}}, headers=MERGE)
        await api_http.delete(f"{PODS}/a?gracePeriodSeconds=0")  # gone at once, not Terminating
        assert await read_events(resp, 2) == [("MODIFIED", "a"), ("DELETED", "a")]


async def test_watch_from_a_resource_version_replays_what_followed_it(
    api_http: aiohttp.ClientSession,
) -> None:
    async with api_http.post(PODS, json=pod("a")) as resp:
        after_a = (await resp.json())["metadata"]["resourceVersion"]
    await api_http.post(PODS, json=pod("b"))
    await api_http.delete(f"{PODS}/a?gracePeriodSeconds=0")  # gone at once, not Terminating
    params = {"watch": "true", "resourceVersion": after_a}
    async with api_http.get(PODS, params=params) as resp:
        assert await read_events(resp, 2) == [("ADDED", "b"), ("DELETED", "a")]


async def test_watch_with_selector_sees_objects_enter_and_leave_it(
    api_http: aiohttp.ClientSession,
) -> None:
    await api_http.post(PODS, json=pod("a", role="secondary"))
    params = {"watch": "1", "labelSelector": "role=primary"}
    async with api_http.get(PODS, params=params) as resp:
        await api_http.post(PODS, json=pod("b", role="secondary"))  # never matches
        await api_http.patch(f"{PODS}/a", json={"metadata": {"labels": {"role": "primary"}}}, headers=MERGE)
        await api_http.patch(f"{PODS}/a", json={"metadata": {"labels": {"role": "old"}}}, headers=MERGE)
        assert await read_events(resp, 2) == [("ADDED", "a"), ("DELETED", "a")]


async def test_watch_ends_after_timeout_seconds(api_http: aiohttp.ClientSession) -> None:
    async with api_http.get(PODS, params={"watch": "true", "timeoutSeconds": "1"}) as resp:
        body = await bounded(resp.read(), 5)
    assert body == b""


async def test_too_old_resource_version_is_410_gone() -> None:
    async with serve(handler=APIServer(history_limit=3)) as (_, url), aiohttp.ClientSession(base_url=url) as http:
        for i in range(5):
            await http.post(PODS, json=pod(f"p{i}"))
        params = {"watch": "true", "resourceVersion": "1"}
        async with http.get(PODS, params=params) as resp:
            event = json.loads(await bounded(resp.content.readline(), 5))
    assert event["type"] == "ERROR"
    assert event["object"]["code"] == 410 and event["object"]["reason"] == "Expired"


def _client_roundtrip(config: Any) -> dict[str, Any]:
    """Sync: what the operator's kubernetes-client code does (runs in a thread)."""
    api_client = kubernetes.client.ApiClient(config)
    core = kubernetes.client.CoreV1Api(api_client)
    custom = kubernetes.client.CustomObjectsApi(api_client)
    coordination = kubernetes.client.CoordinationV1Api(api_client)
    try:
        body = {
            "apiVersion": "pairvol.io/v1alpha1",
            "kind": "ReplicatedVolume",
            "metadata": {"name": "vol"},
            "spec": {"size": 1048576},
        }
        custom.create_namespaced_custom_object("pairvol.io", "v1alpha1", "default", "replicatedvolumes", body)
        custom.patch_namespaced_custom_object_status(
            "pairvol.io",
            "v1alpha1",
            "default",
            "replicatedvolumes",
            "vol",
            {"status": {"phase": "Pending", "epoch": 1}},
        )
        lease = kubernetes.client.V1Lease(
            metadata=kubernetes.client.V1ObjectMeta(name="pairvol-vol"),
            spec=kubernetes.client.V1LeaseSpec(holder_identity="node-1", lease_duration_seconds=5),
        )
        created = coordination.create_namespaced_lease("default", lease)
        stale = created.metadata.resource_version
        created.spec.holder_identity = "node-2"
        coordination.replace_namespaced_lease("pairvol-vol", "default", created)
        created.metadata.resource_version = stale
        try:
            coordination.replace_namespaced_lease("pairvol-vol", "default", created)
            conflict = None
        except kubernetes.client.ApiException as exc:
            conflict = exc.status
        nodes = [n.metadata.name for n in core.list_node().items]
        watch = kubernetes.watch.Watch()
        seen = [
            (event["type"], event["object"]["metadata"]["name"])
            for event in watch.stream(
                custom.list_namespaced_custom_object,
                "pairvol.io",
                "v1alpha1",
                "default",
                "replicatedvolumes",
                timeout_seconds=1,
            )
        ]
        got = custom.get_namespaced_custom_object("pairvol.io", "v1alpha1", "default", "replicatedvolumes", "vol")
        return {"conflict": conflict, "nodes": nodes, "seen": seen, "rv": got}
    finally:
        api_client.close()


async def test_the_kubernetes_client_works_against_the_server(api_cluster: LocalCluster) -> None:
    result = await asyncio.to_thread(_client_roundtrip, api_cluster.kubernetes_configuration())
    assert result["conflict"] == 409
    assert result["nodes"] == ["node-1", "node-2", "node-3"]
    assert result["seen"] == [("ADDED", "vol")]
    assert result["rv"]["status"] == {"phase": "Pending", "epoch": 1}
    assert result["rv"]["spec"]["size"] == 1048576


async def test_a_node_going_not_ready_is_seen_by_node_watchers(
    api_cluster: LocalCluster, api_http: aiohttp.ClientSession
) -> None:
    params = {"watch": "true", "fieldSelector": "metadata.name=node-2"}
    async with api_http.get("/api/v1/nodes", params=params) as resp:
        assert await read_events(resp, 1) == [("ADDED", "node-2")]
        api_cluster.set_node_ready("node-2", False)
        line = await bounded(resp.content.readline(), 5)
    event = json.loads(line)
    assert event["type"] == "MODIFIED"
    ready = [c for c in event["object"]["status"]["conditions"] if c["type"] == "Ready"]
    assert ready[0]["status"] == "False"
