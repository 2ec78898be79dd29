"""Names the operator derives from a volume's: each object it uses or deletes is the volume's own.

Derived names coincide across volumes of one namespace (Secret ``pairvol-db-export`` is
volume ``db-export``'s agents' Secret and volume ``db``'s export Secret; Service
``db-agents`` is volume ``db-agents``'s and ``db``'s agents' Service), and a user's object
may hold one. The operator takes an existing object only if it names the volume (its uid)
among its owners, and its finalizer deletes only those; a volume whose name is taken says
so and starts nothing. Wipe pods get a valid name of their own on every node.

The ownership tests run the operator's own code against the emulated API server.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Any

import kubernetes_validate
import pytest
from tests.support.operator_env import operator_against_the_api

from pairvol.api.spec import parse_spec
from pairvol.kube.client import KubeClient, NotFound
from pairvol.kube.paths import events_path, pods_path, secrets_path, services_path, volume_path
from pairvol.localcluster.cluster import LocalCluster, node_object
from pairvol.operator.handlers import NameTaken, Reconciler, _finalize
from pairvol.operator.manifests import OperatorConfig, cleanup_pod_manifest, cleanup_pod_name

NS = "default"
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
CSI_VOLUME = "pvc-0f6c2b8e-3c1d-4f7a-9b2e-5d8c7a6b4e21"  # 40 characters, the longest name
SHARED = "worker-pool-default-europe-west1-b-instance-group-"  # with "n" + 6 digits: 57


# ------------------------------------------------------------------ wipe pod names


def wipe(volume: str, node: str) -> dict[str, Any]:
    spec = parse_spec({"size": "1Gi", "reclaimPolicy": "Delete"}, name=volume)
    return cleanup_pod_manifest(volume=volume, namespace=NS, node=node, spec=spec,
                                owner={"metadata": {"name": volume, "uid": "u"}}, config=OperatorConfig())


def test_wipe_pods_of_two_nodes_sharing_a_long_prefix_have_distinct_valid_names() -> None:
    nodes = [f"{SHARED}n000001", f"{SHARED}n000002"]
    assert len(nodes[0]) == 57
    names = [wipe(CSI_VOLUME, n)["metadata"]["name"] for n in nodes]
    assert names[0] != names[1], "one replica's data would never be wiped"
    for name, node in zip(names, nodes, strict=True):
        assert DNS_LABEL.match(name), name
        assert name.startswith(f"{CSI_VOLUME}-wipe-"), "readable: whose wipe pod it is"
        assert name == cleanup_pod_name(CSI_VOLUME, node)
        kubernetes_validate.validate(wipe(CSI_VOLUME, node), "1.30", strict=True)


def test_a_wipe_pod_name_never_ends_in_a_dot_or_dash_where_the_node_name_is_cut() -> None:
    # the old name, f"{volume}-wipe-{node}"[:63], ended at the node's 17th character
    for cut in (".", "-"):
        node = f"ip-10-0-12-34{'x' * 3}{cut}eu-west-1.compute.internal"
        name = cleanup_pod_name(CSI_VOLUME, node)
        assert DNS_LABEL.match(name), name
    # short names stay whole (plus the hash)
    assert cleanup_pod_name("db", "node-1").startswith("db-wipe-node-1-")


# ------------------------------------------------------------- ownership, end to end


@pytest.fixture
async def kube() -> AsyncIterator[tuple[LocalCluster, KubeClient]]:
    """The emulated API server, and the operator's context talking to it (no watch caches:
    every read goes to the API server)."""
    async with operator_against_the_api() as env:
        yield env


async def make_rv(kube: KubeClient, name: str, **spec: Any) -> dict[str, Any]:
    body = {"apiVersion": "pairvol.io/v1alpha1", "kind": "ReplicatedVolume",
            "metadata": {"name": name, "namespace": NS}, "spec": {"size": "1Gi", **spec}}
    return await kube.create(volume_path(NS), body)


async def bring_up_infra(kube: KubeClient, name: str, **spec: Any) -> dict[str, Any]:
    """A volume whose operator made its Secrets and Services (what a first tick does)."""
    body = await make_rv(kube, name, **spec)
    await Reconciler(name, NS).ensure_infra(body)
    return body


async def snapshot(kube: KubeClient, path: str) -> tuple[str, Any]:
    obj = await kube.get(path)
    return obj["metadata"]["uid"], obj.get("data") or obj.get("stringData")


async def finalize(body: dict[str, Any]) -> None:
    meta = body["metadata"]
    assert await _finalize(meta["name"], NS, body, body["spec"], body.get("status") or {}, 0.0) is None


async def warnings(kube: KubeClient, volume: str, reason: str) -> list[str]:
    return [e["message"] for e in await kube.list(events_path(NS))
            if e["involvedObject"]["name"] == volume and e["reason"] == reason and e["type"] == "Warning"]


async def test_a_volume_never_takes_the_agents_secret_of_another_whose_name_ends_in_export(
    kube: tuple[LocalCluster, KubeClient],
) -> None:
    _, k = kube
    other = await bring_up_infra(k, "db-export")
    theirs = await snapshot(k, secrets_path(NS, "pairvol-db-export"))  # token, link and export keys
    services = [await snapshot(k, services_path(NS, s)) for s in ("db-export", "db-export-agents")]

    db = await make_rv(k, "db")
    rec = Reconciler("db", NS)
    with pytest.raises(NameTaken, match="Secret pairvol-db-export, which this volume needs, already exists and "
                                        "belongs to ReplicatedVolume db-export"):
        await rec.ensure_infra(db)
    assert not rec.infra_ok, "no agent may start with another volume's keys"
    status = (await k.get(volume_path(NS, "db")))["status"]
    assert status["phase"] == "Pending" and "Secret pairvol-db-export" in status["message"]
    assert "another name" in status["message"]
    (event,) = await warnings(k, "db", "NameTaken")
    assert "ReplicatedVolume db-export" in event
    with pytest.raises(NameTaken):  # the loop's retry: no second Event for the same cause
        await rec.ensure_infra(db)
    assert len(await warnings(k, "db", "NameTaken")) == 1

    await finalize(await k.get(volume_path(NS, "db")))
    assert await snapshot(k, secrets_path(NS, "pairvol-db-export")) == theirs
    assert [await snapshot(k, services_path(NS, s)) for s in ("db-export", "db-export-agents")] == services
    with pytest.raises(NotFound):  # what was db's own went with it
        await k.get(secrets_path(NS, "pairvol-db"))
    assert other["metadata"]["uid"] in str((await k.get(secrets_path(NS, "pairvol-db-export")))["metadata"])


async def test_a_volume_whose_name_ends_in_export_never_builds_on_the_export_secret_of_another(
    kube: tuple[LocalCluster, KubeClient],
) -> None:
    _, k = kube
    await bring_up_infra(k, "db")
    theirs = await snapshot(k, secrets_path(NS, "pairvol-db-export"))  # db's export key only

    late = await make_rv(k, "db-export")
    rec = Reconciler("db-export", NS)
    with pytest.raises(NameTaken, match=r"Secret pairvol-db-export, .* belongs to ReplicatedVolume db"):
        await rec.ensure_infra(late)
    rec.remember(await k.get(volume_path(NS, "db-export")))
    assert await rec._token() is None, "another's Secret is no source of this volume's token"
    with pytest.raises(NotFound):  # nothing derived from db's key
        await k.get(secrets_path(NS, "pairvol-db-export-export"))

    await finalize(await k.get(volume_path(NS, "db-export")))
    assert await snapshot(k, secrets_path(NS, "pairvol-db-export")) == theirs


async def test_services_of_colliding_names_and_a_users_service_are_neither_taken_nor_deleted(
    kube: tuple[LocalCluster, KubeClient],
) -> None:
    _, k = kube
    await bring_up_infra(k, "db")
    agents_service = await snapshot(k, services_path(NS, "db-agents"))
    late = await make_rv(k, "db-agents")
    with pytest.raises(NameTaken, match=r"Service db-agents, .* belongs to ReplicatedVolume db:"):
        await Reconciler("db-agents", NS).ensure_infra(late)
    await finalize(await k.get(volume_path(NS, "db-agents")))
    assert await snapshot(k, services_path(NS, "db-agents")) == agents_service

    users = await k.create(services_path(NS), {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
                                               "spec": {"ports": [{"port": 80}]}})
    web = await make_rv(k, "web")
    with pytest.raises(NameTaken, match=r"Service web, .* belongs to no ReplicatedVolume"):
        await Reconciler("web", NS).ensure_infra(web)
    await finalize(await k.get(volume_path(NS, "web")))
    assert (await k.get(services_path(NS, "web")))["metadata"]["uid"] == users["metadata"]["uid"]


async def test_a_users_secret_of_the_agents_secret_name_is_no_source_of_the_volumes_token(
    kube: tuple[LocalCluster, KubeClient],
) -> None:
    _, k = kube
    users = await k.create(secrets_path(NS), {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "pairvol-app"},
                                              "stringData": {"token": "the-users-own"}})
    app = await make_rv(k, "app")
    rec = Reconciler("app", NS)
    with pytest.raises(NameTaken, match=r"Secret pairvol-app, .* belongs to no ReplicatedVolume"):
        await rec.ensure_infra(app)
    rec.remember(app)
    assert await rec._token() is None, "the operator would send the user's token to agents"
    await finalize(await k.get(volume_path(NS, "app")))
    assert (await k.get(secrets_path(NS, "pairvol-app")))["metadata"]["uid"] == users["metadata"]["uid"]


async def test_a_volume_takes_back_its_own_objects_after_a_restart_and_its_finalizer_deletes_them(
    kube: tuple[LocalCluster, KubeClient],
) -> None:
    _, k = kube
    body = await bring_up_infra(k, "vol")
    secret = await snapshot(k, secrets_path(NS, "pairvol-vol"))
    restarted = Reconciler("vol", NS)  # a new operator process: nothing in memory
    await restarted.ensure_infra(body)
    assert restarted.infra_ok
    restarted.remember(body)
    token = await restarted._token()
    assert token is not None and len(token) > 20
    assert await snapshot(k, secrets_path(NS, "pairvol-vol")) == secret, "the keys the agents hold stay"
    await finalize(body)
    for path in (secrets_path(NS, "pairvol-vol"), secrets_path(NS, "pairvol-vol-export"),
                 services_path(NS, "vol"), services_path(NS, "vol-agents")):
        with pytest.raises(NotFound):
            await k.get(path)


async def test_each_node_of_a_long_named_volume_gets_its_wipe_pod_and_an_unfinished_wipe_is_reported(
    kube: tuple[LocalCluster, KubeClient],
) -> None:
    cluster, k = kube
    nodes = [f"{SHARED}n000001", f"{SHARED}n000002"]
    for n in nodes:
        cluster.api.create_object("", "v1", "nodes", node_object(n))
    body = await make_rv(k, CSI_VOLUME, reclaimPolicy="Delete")
    status = {"dataNodes": nodes}
    waiting = await _finalize(CSI_VOLUME, NS, body, body["spec"], status, 0.0)
    assert waiting == "waiting for data cleanup pods"
    pods = await k.list(pods_path(NS), f"pairvol.io/cleanup={CSI_VOLUME}")
    assert sorted(p["spec"]["nodeName"] for p in pods) == nodes, "a wipe pod on every node with data"
    # no kubelet runs them here: after a minute the finalizer gives up and says where data stayed,
    # and the volume goes once its wipes are gone (forced out when no kubelet confirms their end)
    stopping = "waiting for the data cleanup pods to stop"
    assert await _finalize(CSI_VOLUME, NS, body, body["spec"], status, 61.0) == stopping
    assert await k.list(pods_path(NS), f"pairvol.io/cleanup={CSI_VOLUME}"), "a wipe may still run: it is waited for"
    assert await _finalize(CSI_VOLUME, NS, body, body["spec"], status, 91.0) is None
    assert await k.list(pods_path(NS), f"pairvol.io/cleanup={CSI_VOLUME}") == []
    reported = await warnings(k, CSI_VOLUME, "DataNotRemoved")
    for n in nodes:
        assert any(f"on node {n} was not removed" in r for r in reported), reported


async def test_no_wipe_pod_is_started_after_the_finalizer_gave_up_and_none_outlives_the_volume(
    kube: tuple[LocalCluster, KubeClient],
) -> None:
    """A node that only becomes ready after the finalizer's minute gets no wipe any more: one
    started then would still run (``rm -rf`` of the data dir) once the volume is gone, when a
    new volume of the same name may have placed a replica there."""
    cluster, k = kube
    cluster.api.create_object("", "v1", "nodes", node_object("late-node"))
    body = await make_rv(k, "late", reclaimPolicy="Delete")
    assert await _finalize("late", NS, body, body["spec"], {"dataNodes": ["late-node"]}, 61.0) is None
    assert await k.list(pods_path(NS), "pairvol.io/cleanup=late") == []
    reported = await warnings(k, "late", "DataNotRemoved")
    assert any("on node late-node was not removed" in r for r in reported), reported
