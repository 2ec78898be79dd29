"""Volumes whose data directories nest: only one of them places replicas.

A volume's data directory on the nodes is ``<hostPath>/<namespace>/<name>``, and its deletion
with ``reclaimPolicy: Delete`` removes that whole directory on every node it used. A volume
whose data directory is, contains or lies inside another's would share its files, and the
deletion of either would remove the other's replicas. So of two such volumes the one that
has replicas, or else the one created first, is placed; the other places nothing, stays
Pending and says which volume is in the way and what to do. A wipe never removes a directory
that holds the data of another volume on that node.

Every test builds one observation of the world (no process, no API server) and checks what
the operator would persist and do next.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import pytest
from tests.support.operator_env import operator_against_the_api

from pairvol.api.spec import parse_spec
from pairvol.api.status import Phase, Replica, VolumeStatus
from pairvol.kube.client import KubeClient
from pairvol.kube.paths import events_path, pods_path, volume_path
from pairvol.operator.decisions import (
    CreatePod,
    Event,
    NodeView,
    Plan,
    VolumeDir,
    World,
    data_dir_of,
    dir_relation,
    plan,
    wipe_would_remove,
)
from pairvol.operator.handlers import Reconciler, _finalize

NOW = 1_000_000.0
NODES = (NodeView("n1"), NodeView("n2"), NodeView("n3"))
EARLIER, LATER = NOW - 3600, NOW - 60


def new_volume(host_path: str = "/var/lib/pairvol/pairvol/data/x", *others: VolumeDir, **kw: Any) -> World:
    """Volume ``b`` in namespace ``team``, created at LATER, nothing placed yet."""
    spec = parse_spec({"size": "64Mi", "storage": {"hostPath": host_path}}, name="b")
    return World("b", "team", 1, spec, VolumeStatus(), NOW, nodes=NODES, created=LATER, volume_dirs=others, **kw)


# volume pairvol/data with the default hostPath
DATA = VolumeDir("pairvol/data", "/var/lib/pairvol/pairvol/data", EARLIER)


def placed(p: Plan) -> bool:
    return any(isinstance(a, CreatePod) for a in p.actions) or p.status.primary is not None


def refusal(p: Plan) -> str:
    """The refusal's message: the status says it, one Warning Event says it, nothing is placed."""
    assert not placed(p), "a volume nested in another's data directory must not place replicas"
    assert p.status.phase == Phase.PENDING
    (event,) = [a for a in p.actions if isinstance(a, Event)]
    assert (event.type, event.reason, event.message) == ("Warning", "DataDirConflict", p.status.message)
    assert "Delete this volume and create it again with another spec.storage.hostPath" in p.status.message
    return p.status.message


# ------------------------------------------------------------------ refused


def test_a_volume_whose_data_directory_lies_inside_an_earlier_ones_is_not_placed() -> None:
    p = plan(new_volume("/var/lib/pairvol/pairvol/data/x", DATA))
    msg = refusal(p)
    assert msg.startswith(
        "no replica placed: its data directory /var/lib/pairvol/pairvol/data/x/team/b lies inside "
        "/var/lib/pairvol/pairvol/data, the data directory of ReplicatedVolume pairvol/data (which was created first)"
    )
    assert "deleting either with reclaimPolicy Delete would remove the other's data" in msg


def test_a_volume_whose_data_directory_contains_an_earlier_ones_is_not_placed() -> None:
    # /var/lib/team/b holds team/b's images; /var/lib/team/b/ns/c is another volume's
    inner = VolumeDir("ns/c", "/var/lib/team/b/ns/c", EARLIER)
    msg = refusal(plan(new_volume("/var/lib", inner)))
    assert "its data directory /var/lib/team/b contains /var/lib/team/b/ns/c, the data directory of " \
           "ReplicatedVolume ns/c" in msg


def test_a_volume_whose_data_directory_is_an_earlier_ones_is_not_placed() -> None:
    # the same files for two volumes (the paths as written: a trailing slash, a "." component)
    same = VolumeDir("other/v", "/srv/./pairvol/team/b/", EARLIER)
    msg = refusal(plan(new_volume("/srv/pairvol", same)))
    assert "its data directory /srv/pairvol/team/b is also the data directory of ReplicatedVolume other/v" in msg


def test_nesting_across_namespaces_counts_like_within_one() -> None:
    # a volume in namespace "pairvol" named like namespace "team", with hostPath /var/lib
    outer = VolumeDir("pairvol/team", "/var/lib/pairvol/team", EARLIER)
    msg = refusal(plan(new_volume("/var/lib/pairvol", outer)))
    assert "lies inside /var/lib/pairvol/team, the data directory of ReplicatedVolume pairvol/team" in msg


def test_the_refusal_is_reported_once_and_goes_once_the_other_volume_is_gone() -> None:
    w = new_volume("/var/lib/pairvol/pairvol/data/x", DATA)
    first = plan(w)
    again = plan(replace(w, status=first.status))
    assert again.status.message == first.status.message
    assert not placed(again) and not [a for a in again.actions if isinstance(a, Event)], "no Event flood"
    gone = plan(replace(w, status=first.status, volume_dirs=()))
    assert placed(gone) and gone.status.primary is not None


# ------------------------------------------------------------------ allowed


def test_a_sibling_directory_with_a_common_prefix_is_apart() -> None:
    # /var/lib/pairvol/pairvol/database/... shares the string prefix of .../data, not a directory
    p = plan(new_volume("/var/lib/pairvol/pairvol/database", DATA))
    assert placed(p), p.status.message
    assert dir_relation("/a/bc", "/a/b") is None and dir_relation("/a/b", "/a/bc") is None


def test_the_same_name_in_another_namespace_under_one_hostpath_is_apart() -> None:
    other = VolumeDir("prod/b", "/var/lib/pairvol/prod/b", EARLIER)
    assert placed(plan(new_volume("/var/lib/pairvol", other)))


def test_the_earlier_volume_places_and_keeps_its_replicas_whatever_nests_in_it() -> None:
    # pairvol/data's own view: team/b (later) lies inside its directory
    spec = parse_spec({"size": "64Mi"}, name="data")
    later = VolumeDir("team/b", "/var/lib/pairvol/pairvol/data/x/team/b", LATER)
    w = World("data", "pairvol", 1, spec, VolumeStatus(), NOW, nodes=NODES, created=EARLIER, volume_dirs=(later,))
    p = plan(w)
    assert placed(p), p.status.message
    assert not any(isinstance(a, Event) and a.type == "Warning" for a in p.actions)


def test_creation_time_ties_are_broken_by_namespace_and_name_the_same_way_for_both() -> None:
    # creationTimestamps have a resolution of one second: both volumes must see the same order
    a_dir, b_dir = data_dir_of("/d", "ns", "a"), data_dir_of("/d/ns/a/x", "ns", "b")
    assert dir_relation(b_dir, a_dir) == "inside"
    a = World("a", "ns", 1, parse_spec({"size": "64Mi", "storage": {"hostPath": "/d"}}, name="a"), VolumeStatus(),
              NOW, nodes=NODES, created=LATER, volume_dirs=(VolumeDir("ns/b", b_dir, LATER),))
    b = World("b", "ns", 1, parse_spec({"size": "64Mi", "storage": {"hostPath": "/d/ns/a/x"}}, name="b"),
              VolumeStatus(), NOW, nodes=NODES, created=LATER, volume_dirs=(VolumeDir("ns/a", a_dir, LATER),))
    assert placed(plan(a)), "ns/a comes first by name"
    assert "ReplicatedVolume ns/a (which was created first)" in refusal(plan(b))


def test_a_volume_that_has_replicas_keeps_them_even_if_created_later() -> None:
    # both placed before either could see the other (or before the operator checked): the one
    # with replicas keeps them; the earlier, unplaced one waits rather than share its files
    later_but_placed = VolumeDir("team/b", "/var/lib/pairvol/pairvol/data/x/team/b", LATER, placed=True,
                                 data_nodes=("n1", "n2"))
    spec = parse_spec({"size": "64Mi"}, name="data")
    w = World("data", "pairvol", 1, spec, VolumeStatus(), NOW, nodes=NODES, created=EARLIER,
              volume_dirs=(later_but_placed,))
    assert "ReplicatedVolume team/b (which has replicas)" in refusal(plan(w))


def test_a_volume_with_replicas_is_not_refused_again() -> None:
    # the check is made where replicas are placed; a placed volume goes on as before
    status = VolumeStatus(phase=Phase.PENDING, epoch=1, primary=Replica("n1", "b-1-a", "Placed"),
                          secondary=Replica("n2", "b-1-b", "Placed", out_of_sync=True))
    p = plan(replace(new_volume("/var/lib/pairvol/pairvol/data/x", DATA), status=status))
    assert "DataDirConflict" not in [a.reason for a in p.actions if isinstance(a, Event)]
    assert p.status.primary is not None


# ------------------------------------------------------------------ wipes


def test_a_wipe_never_removes_another_volumes_data_on_that_node() -> None:
    inner = VolumeDir("team/b", "/var/lib/pairvol/pairvol/data/x/team/b", LATER, placed=True, data_nodes=("n1",))
    assert wipe_would_remove("/var/lib/pairvol/pairvol/data", "n1", [inner]) == inner
    assert wipe_would_remove("/var/lib/pairvol/pairvol/data", "n2", [inner]) is None, "no data of it on n2"
    same = replace(inner, path="/var/lib/pairvol/pairvol/data/")
    assert wipe_would_remove("/var/lib/pairvol/pairvol/data", "n1", [same]) == same


def test_a_wipe_removes_the_directory_of_a_refused_volume_nested_in_it() -> None:
    # the refused volume never placed a replica: nothing of its is under the wiped directory
    refused = VolumeDir("team/b", "/var/lib/pairvol/pairvol/data/x/team/b", LATER)
    assert wipe_would_remove("/var/lib/pairvol/pairvol/data", "n1", [refused]) is None


def test_a_wipe_of_a_directory_inside_another_volumes_removes_only_its_own() -> None:
    outer = VolumeDir("pairvol/data", "/var/lib/pairvol/pairvol/data", EARLIER, placed=True, data_nodes=("n1",))
    assert wipe_would_remove("/var/lib/pairvol/pairvol/data/x/team/b", "n1", [outer]) is None
    sibling = VolumeDir("pairvol/database", "/var/lib/pairvol/pairvol/database", EARLIER, data_nodes=("n1",))
    assert wipe_would_remove("/var/lib/pairvol/pairvol/data", "n1", [sibling]) is None


# ------------------------------------------------------- the operator's loop and finalizer
#
# The operator's own code (tick, finalizer) against the emulated API server: the volumes
# are read from the API, placement creates pod objects, no kubelet runs them.

NS = "default"


@pytest.fixture
async def kube() -> AsyncIterator[KubeClient]:
    async with operator_against_the_api({"n1": True, "n2": True}) as (_, client):
        yield client


async def volume(k: KubeClient, name: str, host_path: str, status: dict[str, Any] | None = None) -> dict[str, Any]:
    body = await k.create(volume_path(NS), {
        "apiVersion": "pairvol.io/v1alpha1", "kind": "ReplicatedVolume", "metadata": {"name": name, "namespace": NS},
        "spec": {"size": "1Gi", "reclaimPolicy": "Delete", "storage": {"hostPath": host_path}}})
    if status is not None:
        body = await k.merge_patch(volume_path(NS, name, status=True), {"status": status})
    return body


async def pods_of(k: KubeClient, name: str) -> list[str]:
    return sorted(p["metadata"]["name"] for p in await k.list(pods_path(NS), f"pairvol.io/volume={name}"))


async def warnings(k: KubeClient, name: str, reason: str) -> list[str]:
    return [e["message"] for e in await k.list(events_path(NS))
            if e["involvedObject"]["name"] == name and e["reason"] == reason and e["type"] == "Warning"]


async def test_the_later_of_two_nested_volumes_starts_no_pod_and_the_earlier_is_untouched(kube: KubeClient) -> None:
    k = kube
    await volume(k, "data", "/var/lib/pairvol")  # /var/lib/pairvol/default/data
    await volume(k, "nested", "/var/lib/pairvol/default/data/x")  # .../data/x/default/nested

    await Reconciler("nested", NS).tick()  # data has no replicas yet: it was created first
    assert await pods_of(k, "nested") == [], "a volume nested in another's data directory started pods"
    status = (await k.get(volume_path(NS, "nested")))["status"]
    assert status["phase"] == "Pending" and "primary" not in status and not status.get("dataNodes")
    assert "lies inside /var/lib/pairvol/default/data, the data directory of ReplicatedVolume default/data" \
        in status["message"]
    assert [status["message"]] == await warnings(k, "nested", "DataDirConflict")

    await Reconciler("data", NS).tick()
    assert len(await pods_of(k, "data")) == 2, "the earlier volume places its replicas"
    assert not await warnings(k, "data", "DataDirConflict")
    await Reconciler("nested", NS).tick()  # a new loop (an operator restart): still refused
    assert await pods_of(k, "nested") == []


async def test_deleting_the_refused_volume_wipes_nothing(kube: KubeClient) -> None:
    k = kube
    # x's replicas live in /srv/default/nested/default/x; nested's directory would be /srv/default/nested
    await volume(k, "x", "/srv/default/nested", {
        "phase": "Replicating", "primary": {"node": "n1", "pod": "x-1-a"}, "dataNodes": ["n1", "n2"]})
    await volume(k, "nested", "/srv")
    await Reconciler("nested", NS).tick()
    nested = await k.get(volume_path(NS, "nested"))
    assert "contains /srv/default/nested/default/x" in nested["status"]["message"]
    assert await pods_of(k, "nested") == []
    assert await _finalize("nested", NS, nested, nested["spec"], nested["status"], 0.0) is None
    assert await k.list(pods_path(NS), "pairvol.io/cleanup=nested") == [], "it would remove x's replicas"


async def test_a_wipe_leaves_alone_the_node_where_a_volume_nested_in_it_has_data(kube: KubeClient) -> None:
    # both placed before the operator refused nested data directories: deleting the outer one
    # must not remove the inner one's replica on n1
    k = kube
    outer = await volume(k, "data", "/var/lib/pairvol", {"dataNodes": ["n1", "n2"]})
    await volume(k, "inner", "/var/lib/pairvol/default/data/x", {
        "phase": "Degraded", "primary": {"node": "n1", "pod": "inner-1-a"}, "dataNodes": ["n1"]})
    assert await _finalize("data", NS, outer, outer["spec"], outer["status"], 0.0) == "waiting for data cleanup pods"
    wipes = await k.list(pods_path(NS), "pairvol.io/cleanup=data")
    assert [p["spec"]["nodeName"] for p in wipes] == ["n2"], "the wipe on n1 would remove inner's replica"
    (why,) = set(await warnings(k, "data", "DataNotRemoved"))
    assert why.startswith("data under /var/lib/pairvol/default/data on node n1 was not removed: it holds "
                          "/var/lib/pairvol/default/data/x/default/inner, the data directory of ReplicatedVolume "
                          "default/inner")
