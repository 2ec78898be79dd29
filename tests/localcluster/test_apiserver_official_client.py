"""The emulated API server answers what the official ``kubernetes`` client sends.

pairvol's programs reach the API through that client (:mod:`pairvol.kube`), and users'
tools built on it must run against the local cluster unchanged: its typed calls send
``Accept: application/json, application/yaml, application/vnd.kubernetes.protobuf``,
``fieldManager``, ``pretty``, ``dryRun``, strategic merge patches for built-in kinds,
``DeleteOptions`` bodies, list paging and selector parameters, and watch parameters.
"""

from __future__ import annotations

import asyncio
from typing import Any

import kubernetes

from pairvol.localcluster.cluster import LocalCluster


def _calls(configuration: Any) -> dict[str, Any]:
    api = kubernetes.client.ApiClient(configuration)
    core, leases = kubernetes.client.CoreV1Api(api), kubernetes.client.CoordinationV1Api(api)
    try:
        lease = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": {"name": "p"},
                 "spec": {"holderIdentity": "a"}}
        out: dict[str, Any] = {}
        out["create"] = leases.create_namespaced_lease("default", lease, field_manager="pairvol", pretty="true")
        out["patched"] = leases.patch_namespaced_lease("p", "default", {"spec": {"holderIdentity": "b"}},
                                                        field_manager="pairvol")
        current = leases.read_namespaced_lease("p", "default")
        current.spec.holder_identity = "dry"
        out["dry"] = leases.replace_namespaced_lease("p", "default", current, dry_run="All")
        out["after_dry"] = leases.read_namespaced_lease("p", "default")
        out["page"] = leases.list_namespaced_lease("default", limit=1)
        out["selected"] = core.list_pod_for_all_namespaces(field_selector="spec.nodeName=node-1",
                                                            label_selector="a=b", timeout_seconds=5)
        watch = kubernetes.watch.Watch()
        out["events"] = [e["type"] for e in watch.stream(leases.list_namespaced_lease, "default", timeout_seconds=1,
                                                         allow_watch_bookmarks=True, resource_version="0")]
        out["deleted"] = leases.delete_namespaced_lease(
            "p", "default", body=kubernetes.client.V1DeleteOptions(grace_period_seconds=0,
                                                                   propagation_policy="Background"))
        out["node"] = core.read_node_status("node-1")
        return out
    finally:
        api.close()


async def test_typed_calls_of_the_official_client_are_served() -> None:
    async with LocalCluster(nodes=1) as cluster:
        out = await asyncio.to_thread(_calls, cluster.kubernetes_configuration())
    assert out["create"].metadata.name == "p"
    assert out["patched"].spec.holder_identity == "b"  # strategic merge patch of a built-in kind
    assert out["dry"].spec.holder_identity == "dry" and out["after_dry"].spec.holder_identity == "b"
    assert len(out["page"].items) == 1
    assert out["selected"].items == []
    assert "ADDED" in out["events"]
    assert out["node"].metadata.name == "node-1"
