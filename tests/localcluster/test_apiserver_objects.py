"""The emulated API server behaves like Kubernetes where our operator depends on it.

Each test talks plain HTTP to a real server on a free port (the ``api_http`` fixture),
with the real CRD from crds/replicatedvolumes.yaml registered.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import kmock
import pytest

from pairvol.localcluster.apiserver import APIServer, serve
from pairvol.localcluster.cluster import LocalCluster, LocalClusterError

REPO = Path(__file__).resolve().parents[2]

RVS = "/apis/pairvol.io/v1alpha1/namespaces/default/replicatedvolumes"
PODS = "/api/v1/namespaces/default/pods"
MERGE = {"Content-Type": "application/merge-patch+json"}
JSONPATCH = {"Content-Type": "application/json-patch+json"}


def rv(name: str = "vol", **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "pairvol.io/v1alpha1",
        "kind": "ReplicatedVolume",
        "metadata": {"name": name},
        "spec": {"size": "64Mi", **spec},
    }


async def send(
    http: aiohttp.ClientSession, method: str, url: str, body: Any = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, Any]]:
    async with http.request(method, url, json=body, headers=headers) as resp:
        return resp.status, await resp.json()


async def test_create_sets_server_fields_applies_defaults_and_drops_status(
    api_http: aiohttp.ClientSession,
) -> None:
    body = rv(failover={"mode": "Latest"})
    body["status"] = {"phase": "Replicating"}
    code, obj = await send(api_http, "POST", RVS, body)
    assert code == 201, obj
    meta = obj["metadata"]
    assert meta["uid"] and meta["creationTimestamp"].endswith("Z")
    assert meta["generation"] == 1 and int(meta["resourceVersion"]) > 0
    assert obj["spec"]["checkpoint"] == {"intervalSeconds": 10}
    assert obj["spec"]["failover"] == {"mode": "Latest", "automatic": True, "gracePeriodSeconds": 3}
    assert obj["spec"]["storage"] == {"hostPath": "/var/lib/pairvol"}
    assert "status" not in obj, "status is ignored on create when it is a subresource"


async def test_unknown_fields_are_pruned_with_a_warning_or_rejected_in_strict_mode(
    api_http: aiohttp.ClientSession,
) -> None:
    body = rv(bogus=1)
    async with api_http.post(RVS, json=body) as resp:
        assert resp.status == 201
        assert 'unknown field \\"spec.bogus\\"' in resp.headers["Warning"]
        assert "bogus" not in (await resp.json())["spec"]
    code, status = await send(api_http, "POST", RVS + "?fieldValidation=Strict", rv("v2", x=1))
    assert code == 400
    assert 'strict decoding error: unknown field "spec.x"' in status["message"]


async def test_schema_violations_are_422_with_clear_messages(
    api_http: aiohttp.ClientSession,
) -> None:
    code, status = await send(api_http, "POST", RVS, rv(size="lots"))
    assert code == 422 and status["reason"] == "Invalid"
    assert status["message"].startswith('ReplicatedVolume.pairvol.io "vol" is invalid: ')
    # the pattern and (as in Kubernetes, which still runs CEL after a pattern error) the rule
    assert 'spec.size: Invalid value: "lots": spec.size in body should match' in status["message"]
    assert 'Invalid value: "lots": spec.size must be a whole number of bytes' in status["message"]
    assert status["details"]["causes"][0]["field"] == "spec.size"

    code, status = await send(api_http, "POST", RVS, rv(failover={"mode": "Sometimes"}))
    assert code == 422
    assert (
        'spec.failover.mode: Unsupported value: "Sometimes": supported values: '
        '"Checkpoint", "Latest"' in status["message"]
    )

    code, status = await send(api_http, "POST", RVS, rv(replication={"peerTimeoutSeconds": 0}))
    assert code == 422
    assert "spec.replication.peerTimeoutSeconds in body should be greater than or equal to 1" in status["message"]

    no_size = rv()
    del no_size["spec"]["size"]
    code, status = await send(api_http, "POST", RVS, no_size)
    assert code == 422 and "spec.size: Required value" in status["message"]

    code, status = await send(api_http, "POST", RVS, rv(storage={"hostPath": "/a/../etc"}))
    assert code == 422
    assert "storage.hostPath must be an absolute path without '..'" in status["message"]


async def test_a_claim_grows_only_with_a_class_that_allows_it_and_never_shrinks(
    api_http: aiohttp.ClientSession,
) -> None:
    claims = "/api/v1/namespaces/default/persistentvolumeclaims"
    classes = "/apis/storage.k8s.io/v1/storageclasses"
    for name, allow in (("fixed", False), ("growing", True)):
        sc = {"apiVersion": "storage.k8s.io/v1", "kind": "StorageClass", "metadata": {"name": name},
              "provisioner": "pairvol.io", "allowVolumeExpansion": allow}  # fmt: skip
        assert (await send(api_http, "POST", classes, sc))[0] == 201
        claim = {
            "apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": name},
            "spec": {"storageClassName": name, "accessModes": ["ReadWriteOnce"],
                     "resources": {"requests": {"storage": "1Gi"}}},
        }  # fmt: skip
        assert (await send(api_http, "POST", claims, claim))[0] == 201
        bound = {"status": {"phase": "Bound"}}
        assert (await send(api_http, "PATCH", f"{claims}/{name}/status", bound, MERGE))[0] == 200
    grow = {"spec": {"resources": {"requests": {"storage": "2Gi"}}}}
    code, status = await send(api_http, "PATCH", f"{claims}/fixed", grow, MERGE)
    assert code == 403 and "the storageclass that provisions the pvc must support resize" in status["message"]
    code, obj = await send(api_http, "PATCH", f"{claims}/growing", grow, MERGE)
    assert code == 200 and obj["spec"]["resources"]["requests"]["storage"] == "2Gi"
    shrink = {"spec": {"resources": {"requests": {"storage": "1Gi"}}}}
    code, status = await send(api_http, "PATCH", f"{claims}/growing", shrink, MERGE)
    assert code == 422 and "can not be less than previous value" in status["message"]


async def test_size_grows_but_never_shrinks_by_its_cel_rule(api_http: aiohttp.ClientSession) -> None:
    assert (await send(api_http, "POST", RVS, rv()))[0] == 201
    code, status = await send(api_http, "PATCH", f"{RVS}/vol", {"spec": {"size": "32Mi"}}, MERGE)
    assert code == 422
    assert 'spec.size: Invalid value: "32Mi": spec.size may grow but never shrink' in status["message"]
    code, obj = await send(api_http, "PATCH", f"{RVS}/vol", {"spec": {"size": "64Mi"}}, MERGE)
    assert code == 200 and obj["spec"]["size"] == "64Mi"
    code, obj = await send(api_http, "PATCH", f"{RVS}/vol", {"spec": {"size": "1Gi"}}, MERGE)
    assert code == 200 and obj["spec"]["size"] == "1Gi"


async def test_the_host_path_never_changes_by_its_cel_rule(api_http: aiohttp.ClientSession) -> None:
    assert (await send(api_http, "POST", RVS, rv(storage={"hostPath": "/srv/pairvol"})))[0] == 201
    code, status = await send(api_http, "PATCH", f"{RVS}/vol", {"spec": {"storage": {"hostPath": "/data"}}}, MERGE)
    assert code == 422
    assert "storage.hostPath cannot change: the replicas' files are under the old path" in status["message"]
    code, obj = await send(api_http, "PATCH", f"{RVS}/vol", {"spec": {"storage": {"hostPath": "/srv/pairvol"}}}, MERGE)
    assert code == 200 and obj["spec"]["storage"]["hostPath"] == "/srv/pairvol"


async def test_status_subresource_isolation_and_generation(
    api_http: aiohttp.ClientSession,
) -> None:
    _, created = await send(api_http, "POST", RVS, rv())
    rv0 = int(created["metadata"]["resourceVersion"])

    # A status write through /status changes status only, and not the generation.
    code, obj = await send(
        api_http, "PATCH", f"{RVS}/vol/status", {"status": {"phase": "Syncing"}, "spec": {"nodes": ["x"]}}, MERGE
    )
    assert code == 200
    assert obj["status"] == {"phase": "Syncing"}
    assert "nodes" not in obj["spec"] and obj["metadata"]["generation"] == 1
    assert int(obj["metadata"]["resourceVersion"]) > rv0

    # A write to the main resource keeps status, and a spec change bumps the generation.
    code, obj = await send(
        api_http, "PATCH", f"{RVS}/vol", {"status": {"phase": "Failed"}, "spec": {"nodes": ["node-1"]}}, MERGE
    )
    assert code == 200
    assert obj["status"] == {"phase": "Syncing"} and obj["spec"]["nodes"] == ["node-1"]
    assert obj["metadata"]["generation"] == 2

    # Metadata-only changes do not bump the generation.
    code, obj = await send(api_http, "PATCH", f"{RVS}/vol", {"metadata": {"labels": {"a": "b"}}}, MERGE)
    assert code == 200 and obj["metadata"]["generation"] == 2

    # Status fields the CRD does not declare are pruned, declared ones are validated.
    code, obj = await send(api_http, "PATCH", f"{RVS}/vol/status", {"status": {"junk": 1, "epoch": 3}}, MERGE)
    assert code == 200 and "junk" not in obj["status"] and obj["status"]["epoch"] == 3
    code, status = await send(api_http, "PATCH", f"{RVS}/vol/status", {"status": {"phase": "Sleeping"}}, MERGE)
    assert code == 422 and "status.phase: Unsupported value" in status["message"]
    ready = {"type": "Ready", "status": "True"}
    code, status = await send(api_http, "PATCH", f"{RVS}/vol/status", {"status": {"conditions": [ready, ready]}}, MERGE)
    assert code == 422
    assert 'status.conditions[1]: Duplicate value: {"type": "Ready"}' in status["message"]


async def test_a_noop_write_does_not_change_the_resource_version(
    api_http: aiohttp.ClientSession,
) -> None:
    _, created = await send(api_http, "POST", RVS, rv())
    _, same = await send(api_http, "PATCH", f"{RVS}/vol", {"spec": {"size": "64Mi"}}, MERGE)
    assert same["metadata"]["resourceVersion"] == created["metadata"]["resourceVersion"]


async def test_stale_resource_versions_conflict(api_http: aiohttp.ClientSession) -> None:
    _, obj = await send(api_http, "POST", RVS, rv())
    stale = obj["metadata"]["resourceVersion"]
    obj["spec"]["nodes"] = ["node-1"]
    code, updated = await send(api_http, "PUT", f"{RVS}/vol", obj)
    assert code == 200 and updated["metadata"]["resourceVersion"] != stale

    obj["spec"]["nodes"] = ["node-2"]  # still carries the stale resourceVersion
    code, status = await send(api_http, "PUT", f"{RVS}/vol", obj)
    assert code == 409 and status["reason"] == "Conflict"
    assert "the object has been modified" in status["message"]

    patch = {"metadata": {"resourceVersion": stale}, "spec": {"nodes": ["node-3"]}}
    code, status = await send(api_http, "PATCH", f"{RVS}/vol", patch, MERGE)
    assert code == 409

    del obj["metadata"]["resourceVersion"]
    code, status = await send(api_http, "PUT", f"{RVS}/vol", obj)
    assert code == 422 and "metadata.resourceVersion" in status["message"]

    code, status = await send(api_http, "DELETE", f"{RVS}/vol", {"preconditions": {"resourceVersion": stale}})
    assert code == 409


async def test_finalizers_delay_deletion_until_removed(api_http: aiohttp.ClientSession) -> None:
    body = rv()
    body["metadata"]["finalizers"] = ["pairvol.io/cleanup"]
    await send(api_http, "POST", RVS, body)

    code, obj = await send(api_http, "DELETE", f"{RVS}/vol")
    assert code == 200 and obj["metadata"]["deletionTimestamp"]
    code, obj = await send(api_http, "GET", f"{RVS}/vol")
    assert code == 200 and obj["metadata"]["finalizers"] == ["pairvol.io/cleanup"]

    code, status = await send(
        api_http, "PATCH", f"{RVS}/vol", {"metadata": {"finalizers": ["pairvol.io/cleanup", "x/y"]}}, MERGE
    )
    assert code == 422 and "no new finalizers can be added" in status["message"]

    code, _ = await send(
        api_http, "PATCH", f"{RVS}/vol", [{"op": "remove", "path": "/metadata/finalizers/0"}], JSONPATCH
    )
    assert code == 200
    code, status = await send(api_http, "GET", f"{RVS}/vol")
    assert code == 404 and status["message"] == 'replicatedvolumes.pairvol.io "vol" not found'


async def test_errors_are_status_objects(api_http: aiohttp.ClientSession) -> None:
    code, status = await send(api_http, "GET", f"{RVS}/missing")
    assert (code, status["kind"], status["reason"], status["code"]) == (404, "Status", "NotFound", 404)
    await send(api_http, "POST", RVS, rv())
    code, status = await send(api_http, "POST", RVS, rv())
    assert code == 409 and status["reason"] == "AlreadyExists"
    code, status = await send(api_http, "POST", "/apis/pairvol.io/v1alpha1/namespaces/nope/replicatedvolumes", rv())
    assert code == 404 and status["message"] == 'namespaces "nope" not found'
    code, status = await send(api_http, "POST", RVS, rv("Bad_Name"))
    assert code == 422 and "metadata.name" in status["message"]
    code, status = await send(
        api_http, "PATCH", f"{RVS}/vol", {"spec": {}}, {"Content-Type": "application/strategic-merge-patch+json"}
    )
    assert code == 415 and "merge-patch+json" in status["message"]
    code, status = await send(api_http, "GET", "/apis/pairvol.io/v1alpha1/nothings")
    assert code == 404 and "nothings" in status["message"]


def pod(name: str, node: str, **labels: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": labels},
        "spec": {"nodeName": node, "containers": [{"name": "c", "image": "agent"}]},
    }


async def test_a_running_pod_is_deleted_gracefully_and_stays_until_finalized_with_zero_grace(
    api_http: aiohttp.ClientSession,
) -> None:
    """As kube-apiserver: DELETE of a pod a node runs only marks it (deletionTimestamp +
    grace); its kubelet may still post status; a zero-grace DELETE removes it. A pod on a
    dead node therefore stays Terminating, and monitoring still sees it."""
    body = pod("bound", "node-1")
    body["spec"]["terminationGracePeriodSeconds"] = 7
    await send(api_http, "POST", PODS, body)
    code, obj = await send(api_http, "DELETE", f"{PODS}/bound")
    assert code == 200 and obj["metadata"]["deletionGracePeriodSeconds"] == 7 and obj["metadata"]["deletionTimestamp"]
    code, _ = await send(api_http, "PATCH", f"{PODS}/bound/status", {"status": {"phase": "Running"}}, MERGE)
    assert code == 200
    code, obj = await send(api_http, "DELETE", f"{PODS}/bound", {"kind": "DeleteOptions", "gracePeriodSeconds": 2})
    assert obj["metadata"]["deletionGracePeriodSeconds"] == 2, "a shorter grace period shortens it"
    code, obj = await send(api_http, "GET", f"{PODS}/bound")
    assert code == 200 and obj["metadata"]["deletionGracePeriodSeconds"] == 2
    code, _ = await send(api_http, "DELETE", f"{PODS}/bound?gracePeriodSeconds=0")
    assert code == 200
    code, _ = await send(api_http, "GET", f"{PODS}/bound")
    assert code == 404

    unscheduled = pod("pending", "")
    del unscheduled["spec"]["nodeName"]
    await send(api_http, "POST", PODS, unscheduled)
    await send(api_http, "DELETE", f"{PODS}/pending")
    code, _ = await send(api_http, "GET", f"{PODS}/pending")
    assert code == 404, "a pod no node runs goes at once"


async def test_a_terminating_pod_with_a_finalizer_goes_when_its_grace_is_over_and_the_finalizer_is_removed(
    api_http: aiohttp.ClientSession,
) -> None:
    body = pod("held", "node-1")
    body["metadata"]["finalizers"] = ["x.io/hold"]
    await send(api_http, "POST", PODS, body)
    await send(api_http, "DELETE", f"{PODS}/held")
    code, obj = await send(api_http, "DELETE", f"{PODS}/held?gracePeriodSeconds=0")  # the kubelet is done
    assert code == 200 and obj["metadata"]["deletionGracePeriodSeconds"] == 0
    await send(api_http, "PATCH", f"{PODS}/held", {"metadata": {"finalizers": None}}, MERGE)
    code, _ = await send(api_http, "GET", f"{PODS}/held")
    assert code == 404


async def test_label_and_field_selectors(api_http: aiohttp.ClientSession) -> None:
    await send(api_http, "POST", PODS, pod("a", "node-1", role="primary", vol="v"))
    await send(api_http, "POST", PODS, pod("b", "node-2", role="secondary", vol="v"))
    await send(api_http, "POST", PODS, pod("c", "node-1"))

    async def names(query: str) -> list[str]:
        code, body = await send(api_http, "GET", f"{PODS}?{query}")
        assert code == 200, body
        return [i["metadata"]["name"] for i in body["items"]]

    assert await names("labelSelector=role%3Dprimary") == ["a"]
    assert await names("labelSelector=vol%3Dv,role!%3Dprimary") == ["b"]
    assert await names("labelSelector=role+in+(primary,secondary)") == ["a", "b"]
    assert await names("labelSelector=!role") == ["c"]
    assert await names("fieldSelector=spec.nodeName%3Dnode-1") == ["a", "c"]
    assert await names("fieldSelector=metadata.name%3Db") == ["b"]
    assert await names("fieldSelector=status.phase%3DPending") == ["a", "b", "c"]
    code, status = await send(api_http, "GET", f"{PODS}?labelSelector=a+in+b")
    assert code == 400 and "unable to parse requirement" in status["message"]


async def test_pods_start_pending_and_node_status_is_a_subresource(
    api_http: aiohttp.ClientSession,
) -> None:
    code, obj = await send(api_http, "POST", PODS, pod("a", "node-1"))
    assert obj["status"]["phase"] == "Pending"
    code, obj = await send(
        api_http, "PATCH", f"{PODS}/a/status", {"status": {"phase": "Running", "podIP": "10.0.0.5"}}, MERGE
    )
    assert code == 200 and obj["status"]["phase"] == "Running"
    code, node = await send(api_http, "GET", "/api/v1/nodes/node-1")
    assert code == 200
    assert node["status"]["conditions"][0] == {**node["status"]["conditions"][0], "type": "Ready", "status": "True"}


async def test_deleting_a_namespace_deletes_its_content(api_http: aiohttp.ClientSession) -> None:
    await send(api_http, "POST", "/api/v1/namespaces", {"metadata": {"name": "tmp"}})
    await send(api_http, "POST", "/api/v1/namespaces/tmp/secrets", {"metadata": {"name": "s"}, "data": {"k": "dg=="}})
    code, _ = await send(api_http, "DELETE", "/api/v1/namespaces/tmp")
    assert code == 200
    assert (await send(api_http, "GET", "/api/v1/namespaces/tmp/secrets/s"))[0] == 404
    assert (await send(api_http, "GET", "/api/v1/namespaces/tmp"))[0] == 404


async def test_discovery_serves_our_crd_and_kopf_peering(api_http: aiohttp.ClientSession) -> None:
    _, groups = await send(api_http, "GET", "/apis")
    names = {g["name"] for g in groups["groups"]}
    assert {"pairvol.io", "kopf.dev", "coordination.k8s.io", "apiextensions.k8s.io", "events.k8s.io"} <= names
    _, res = await send(api_http, "GET", "/apis/pairvol.io/v1alpha1")
    entries = {r["name"]: r for r in res["resources"]}
    assert entries["replicatedvolumes"]["kind"] == "ReplicatedVolume"
    assert entries["replicatedvolumes"]["shortNames"] == ["rv"]
    assert entries["replicatedvolumes"]["namespaced"] is True
    assert "replicatedvolumes/status" in entries
    _, core = await send(api_http, "GET", "/api/v1")
    assert core["groupVersion"] == "v1"
    for unknown in ("/apis/nope.io", "/apis/nope.io/v1", "/api/v2", "/nothing"):
        code, status = await send(api_http, "GET", unknown)
        assert (code, status["message"]) == (404, "the server could not find the requested resource"), unknown
    code, status = await send(api_http, "GET", "/openapi/v2")
    assert (code, status["kind"]) == (404, "Status"), "only OpenAPI v3 is served"
    code, openapi = await send(api_http, "GET", "/openapi/v3")
    assert code == 200 and "apis/pairvol.io/v1alpha1" in openapi["paths"]


async def test_crds_can_be_registered_and_removed_at_runtime(
    api_http: aiohttp.ClientSession,
) -> None:
    crd: dict[str, Any] = {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": "widgets.example.com"},
        "spec": {
            "group": "example.com",
            "scope": "Cluster",
            "names": {"plural": "widgets", "kind": "Widget"},
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "properties": {
                                "spec": {
                                    "type": "object",
                                    "x-kubernetes-validations": [
                                        {"rule": "self.min <= self.max", "message": "min must be <= max"}
                                    ],
                                    "properties": {"min": {"type": "integer"}, "max": {"type": "integer"}},
                                }
                            },
                        }
                    },
                }
            ],
        },
    }
    code, obj = await send(api_http, "POST", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions", crd)
    assert code == 201, obj
    assert {c["type"] for c in obj["status"]["conditions"]} == {"Established", "NamesAccepted"}
    url = "/apis/example.com/v1/widgets"
    widget = {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}}
    code, status = await send(api_http, "POST", url, {**widget, "spec": {"min": 3, "max": 1}})
    assert code == 422 and "spec: Invalid value" in status["message"]
    assert "min must be <= max" in status["message"]
    assert (await send(api_http, "POST", url, {**widget, "spec": {"min": 1, "max": 3}}))[0] == 201
    code, _ = await send(
        api_http, "DELETE", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/widgets.example.com"
    )
    assert code == 200
    assert (await send(api_http, "GET", url))[0] == 404

    bad: dict[str, Any] = {**crd, "metadata": {"name": "gadgets.example.com"}}
    bad["spec"] = {**crd["spec"], "names": {"plural": "gadgets", "kind": "Gadget"}}
    bad["spec"]["versions"] = [
        {
            **crd["spec"]["versions"][0],
            "schema": {
                "openAPIV3Schema": {"type": "object", "x-kubernetes-validations": [{"rule": "self.quantity('1')"}]}
            },
        }
    ]
    code, status = await send(api_http, "POST", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions", bad)
    assert code == 422 and "quantity() is not supported by this emulator" in status["message"]


async def test_events_are_shared_between_core_and_events_k8s_io(
    api_http: aiohttp.ClientSession,
) -> None:
    new_api = "/apis/events.k8s.io/v1/namespaces/default/events"
    core_api = "/api/v1/namespaces/default/events"
    code, created = await send(
        api_http,
        "POST",
        new_api,
        {
            "apiVersion": "events.k8s.io/v1",
            "kind": "Event",
            "metadata": {"name": "e1"},
            "eventTime": "2024-01-01T00:00:00.000000Z",
            "regarding": {"kind": "ReplicatedVolume", "name": "vol", "namespace": "default"},
            "note": "failed over",
            "reason": "FailedOver",
            "type": "Warning",
            "action": "Failover",
            "reportingController": "pairvol.io/operator",
            "reportingInstance": "op-1",
        },
    )
    assert code == 201, created
    assert created["note"] == "failed over" and created["apiVersion"] == "events.k8s.io/v1"
    code, core = await send(api_http, "GET", f"{core_api}?fieldSelector=involvedObject.name%3Dvol")
    assert [(e["message"], e["involvedObject"]["kind"], e["source"]["component"]) for e in core["items"]] == [
        ("failed over", "ReplicatedVolume", "pairvol.io/operator")
    ]
    code, patched = await send(api_http, "PATCH", f"{new_api}/e1", {"note": "done"}, MERGE)
    assert code == 200 and patched["note"] == "done"
    code, core_e1 = await send(api_http, "GET", f"{core_api}/e1")
    assert core_e1["message"] == "done"


async def test_kmock_reactions_still_inject_faults_over_the_store() -> None:
    api = APIServer()
    leases = kmock.resource("coordination.k8s.io", "v1", "leases")
    api["patch", leases] << 503
    url = "/apis/coordination.k8s.io/v1/namespaces/default/leases"
    async with serve(handler=api) as (_, base), aiohttp.ClientSession(base_url=base) as http:
        code, _ = await send(http, "POST", url, {"metadata": {"name": "l"}, "spec": {}})
        assert code == 201
        async with http.patch(f"{url}/l", json={"spec": {"holderIdentity": "x"}}, headers=MERGE) as resp:
            assert resp.status == 503  # the injected fault, not the store
        code, lease = await send(http, "GET", f"{url}/l")
        assert code == 200 and lease["spec"] == {}
    assert len(list(api["patch", leases])) == 1  # kmock recorded the request for assertions


async def test_concurrent_writers_with_one_resource_version_have_one_winner(
    api_http: aiohttp.ClientSession,
) -> None:
    _, obj = await send(
        api_http,
        "POST",
        "/apis/coordination.k8s.io/v1/namespaces/default/leases",
        {"metadata": {"name": "l"}, "spec": {}},
    )
    url = "/apis/coordination.k8s.io/v1/namespaces/default/leases/l"

    async def claim(holder: str) -> int:
        body = {**obj, "spec": {"holderIdentity": holder}}
        return (await send(api_http, "PUT", url, body))[0]

    codes = await asyncio.gather(*(claim(f"node-{i}") for i in range(20)))
    assert sorted(codes) == [200] + [409] * 19
    _, lease = await send(api_http, "GET", url)
    assert lease["spec"]["holderIdentity"] == f"node-{codes.index(200)}"


async def test_deleting_an_owner_garbage_collects_its_dependents(api_http: aiohttp.ClientSession) -> None:
    async def owned_by(owner: dict[str, Any], name: str) -> None:
        ref = {
            "apiVersion": "pairvol.io/v1alpha1",
            "kind": "ReplicatedVolume",
            "name": owner["metadata"]["name"],
            "uid": owner["metadata"]["uid"],
            "controller": True,
            "blockOwnerDeletion": True,
        }
        body = pod(name, "node-1")
        body["metadata"]["ownerReferences"] = [ref]
        assert (await send(api_http, "POST", PODS, body))[0] == 201
        secret = {"metadata": {"name": name, "ownerReferences": [ref]}, "data": {}}
        assert (await send(api_http, "POST", "/api/v1/namespaces/default/secrets", secret))[0] == 201

    body = rv("owner")
    body["metadata"]["finalizers"] = ["pairvol.io/cleanup"]
    _, owner = await send(api_http, "POST", RVS, body)
    await owned_by(owner, "agent-1")
    _, keeper = await send(api_http, "POST", RVS, rv("keeper"))
    await owned_by(keeper, "agent-2")

    await send(api_http, "DELETE", f"{RVS}/owner")
    assert (await send(api_http, "GET", f"{PODS}/agent-1"))[0] == 200, "the owner still exists (finalizer)"
    await send(api_http, "PATCH", f"{RVS}/owner", {"metadata": {"finalizers": None}}, MERGE)
    code, agent = await send(api_http, "GET", f"{PODS}/agent-1")  # bound to a node: its kubelet finalizes
    assert code == 200 and agent["metadata"]["deletionTimestamp"], "the collected pod is Terminating"
    assert (await send(api_http, "GET", "/api/v1/namespaces/default/secrets/agent-1"))[0] == 404

    await send(api_http, "DELETE", f"{RVS}/keeper", {"propagationPolicy": "Orphan"})
    assert (await send(api_http, "GET", f"{PODS}/agent-2"))[0] == 200, "orphaned, not collected"


async def test_local_cluster_apply_creates_replaces_and_explains_failures(api_cluster: LocalCluster) -> None:
    applied = await api_cluster.apply_dir(REPO / "crds")  # the second time: replaced, not duplicated
    assert {o["metadata"]["name"] for o in applied} >= {"replicatedvolumes.pairvol.io"}
    first = api_cluster.apply(rv("vol", failover={"mode": "Latest"}))
    second = api_cluster.apply(rv("vol", failover={"mode": "Checkpoint"}))
    assert second["metadata"]["uid"] == first["metadata"]["uid"]
    assert second["metadata"]["generation"] == 2 and second["spec"]["failover"]["mode"] == "Checkpoint"
    with pytest.raises(LocalClusterError, match=r"spec\.size may grow but never shrink"):
        api_cluster.apply(rv("vol", size="1Mi"))
    with pytest.raises(LocalClusterError, match="does not serve that kind; apply its CRD first"):
        api_cluster.apply({"apiVersion": "example.com/v1", "kind": "Nope", "metadata": {"name": "x"}})


async def test_updating_a_crd_changes_what_is_served(api_http: aiohttp.ClientSession) -> None:
    crds = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"
    version = {"served": True, "storage": False, "schema": {"openAPIV3Schema": {"type": "object"}}}
    crd: dict[str, Any] = {
        "metadata": {"name": "things.example.com"},
        "spec": {
            "group": "example.com",
            "scope": "Namespaced",
            "names": {"plural": "things", "kind": "Thing"},
            "versions": [{**version, "name": "v1"}, {**version, "name": "v2", "storage": True}],
        },
    }
    code, created = await send(api_http, "POST", crds, crd)
    assert code == 201, created
    assert (await send(api_http, "GET", "/apis/example.com/v1"))[0] == 200
    created["spec"]["versions"] = created["spec"]["versions"][1:]
    code, updated = await send(api_http, "PUT", f"{crds}/things.example.com", created)
    assert code == 200, updated
    assert (await send(api_http, "GET", "/apis/example.com/v1"))[0] == 404
    code, group = await send(api_http, "GET", "/apis/example.com")
    assert [v["version"] for v in group["versions"]] == ["v2"]
