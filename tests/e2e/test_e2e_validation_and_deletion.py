"""Specs the operator must refuse, and clean deletion — with the real operator process."""

from __future__ import annotations

from typing import Any

import pytest

from pairvol.kube.client import KubeError
from pairvol.kube.paths import lease_path, netpol_path, secrets_path, services_path
from pairvol.localcluster.demo import Stack

pytestmark = [pytest.mark.e2e, pytest.mark.netns, pytest.mark.timeout(180)]


async def test_invalid_specs_are_rejected_with_clear_messages(stack: Stack, volume: Any) -> None:
    # what the CRD schema can express is refused by the API server itself ...
    with pytest.raises(KubeError) as err:
        await stack.apply(volume("bad-mode", failover={"mode": "Sometimes"}))
    assert err.value.status == 422 and "spec.failover.mode" in str(err.value)
    with pytest.raises(KubeError) as err:  # sizes: the CRD's CEL rules compare quantities
        await stack.apply(volume("too-small", size="1k"))
    assert err.value.status == 422 and "spec.size must be a whole number of bytes" in str(err.value)

    # ... the rest by the operator: phase Failed/Pending, a message saying what to fix, an Event
    await stack.apply(volume("rootfs", storage={"hostPath": "/"}))
    await stack.apply(volume("ghost", nodes=["node-1", "node-9"]))

    st = await stack.wait_phase("rootfs", "Failed", within=30)
    assert "spec.storage.hostPath '/' must not be '/'" in st["message"]
    st = await stack.wait_phase("ghost", "Pending", within=30)
    assert "need two eligible nodes, found 1 (node-1)" in st["message"]

    reasons = {e["reason"] for e in await stack.events("rootfs")}
    assert "InvalidSpec" in reasons
    assert "NotEnoughNodes" in {e["reason"] for e in await stack.events("ghost")}
    for name in ("rootfs", "ghost"):
        assert await stack.pods(name) == [], f"{name}: no agent pod may be created"


async def _assert_gone(stack: Stack, name: str) -> None:
    ns = stack.namespace

    async def gone() -> bool:
        leftovers = [
            await stack.kube.get_or_none(f"/apis/pairvol.io/v1alpha1/namespaces/{ns}/"
                                         f"replicatedvolumes/{name}"),
            await stack.kube.get_or_none(services_path(ns, name)),
            await stack.kube.get_or_none(services_path(ns, f"{name}-agents")),
            await stack.kube.get_or_none(secrets_path(ns, f"pairvol-{name}")),
            await stack.kube.get_or_none(lease_path(ns, f"pairvol-{name}")),
            await stack.kube.get_or_none(netpol_path(ns, f"pairvol-{name}-replication")),
        ]
        return all(x is None for x in leftovers) and not await stack.pods(name)

    await stack.wait_for(f"{name} and everything it owns to be deleted", gone, within=60)


@pytest.mark.parametrize("policy", ["Retain", "Delete"])
async def test_deletion_stops_agents_and_keeps_or_removes_data(
    stack: Stack, volume: Any, policy: str
) -> None:
    name = f"del-{policy.lower()}"
    await stack.apply(volume(name, reclaimPolicy=policy))
    st = await stack.wait_phase(name, "Replicating", within=120)
    nodes = [st["primary"]["node"], st["secondary"]["node"]]
    dirs = [stack.sim.host_path(n, f"/var/lib/pairvol/{stack.namespace}/{name}") for n in nodes]
    assert all(d.exists() for d in dirs)
    assert await stack.kube.get_or_none(netpol_path(stack.namespace, f"pairvol-{name}-replication"))
    log_offset = stack.operator.log_path.stat().st_size
    await stack.kube.delete(f"/apis/pairvol.io/v1alpha1/namespaces/{stack.namespace}/"
                            f"replicatedvolumes/{name}")
    await _assert_gone(stack, name)
    with stack.operator.log_path.open("rb") as f:
        f.seek(log_offset)
        errors = [line for line in f.read().decode(errors="replace").splitlines() if " ERROR " in line]
    assert errors == [], "a normal deletion logs no ERROR (waiting for pods to go is normal)"
    if policy == "Retain":
        assert all(d.exists() and any(d.iterdir()) for d in dirs), "Retain keeps the images"
    else:
        assert not any(d.exists() for d in dirs), "Delete removes the data on both nodes"


async def test_deletion_of_a_volume_that_never_became_ready(stack: Stack, volume: Any) -> None:
    await stack.apply(volume("never", nodes=["node-1", "node-9"]))
    await stack.wait_phase("never", "Pending", within=30)
    await stack.kube.delete(f"/apis/pairvol.io/v1alpha1/namespaces/{stack.namespace}/"
                            "replicatedvolumes/never")
    await _assert_gone(stack, "never")


async def test_deletion_completes_even_when_a_replica_node_is_dead(stack: Stack, volume: Any) -> None:
    st = await stack.apply(volume("deadnode")) and await stack.wait_phase("deadnode", "Replicating", within=120)
    await stack.sim.kill_node(st["secondary"]["node"])
    await stack.kube.delete(f"/apis/pairvol.io/v1alpha1/namespaces/{stack.namespace}/replicatedvolumes/deadnode")
    await _assert_gone(stack, "deadnode")


async def test_reclaim_delete_removes_the_data_of_every_replica_the_volume_had(stack: Stack, volume: Any) -> None:
    """A secondary replaced after it died leaves its images on its node; Delete must remove
    them too. The dead secondary's node is cordoned so that the replacement goes elsewhere."""
    name = "del-moved"
    await stack.apply(volume(name, reclaimPolicy="Delete"))
    st = await stack.wait_phase(name, "Replicating", within=120)
    old_sec = st["secondary"]
    await stack.kube.merge_patch(f"/api/v1/nodes/{old_sec['node']}", {"spec": {"unschedulable": True}})
    await stack.sim.kill_pod(stack.namespace, old_sec["pod"])

    async def elsewhere() -> dict[str, Any] | None:
        cur = await stack.status(name)
        ok = cur.get("phase") == "Replicating" and cur["secondary"]["node"] != old_sec["node"]
        return cur if ok else None

    st = await stack.wait_for("re-protection on another node", elsewhere, within=150)
    await stack.kube.merge_patch(f"/api/v1/nodes/{old_sec['node']}", {"spec": {"unschedulable": False}})
    nodes = {st["primary"]["node"], st["secondary"]["node"], old_sec["node"]}
    assert len(nodes) == 3
    dirs = [stack.sim.host_path(n, f"/var/lib/pairvol/{stack.namespace}/{name}") for n in sorted(nodes)]
    assert all(d.exists() for d in dirs)
    await stack.kube.delete(f"/apis/pairvol.io/v1alpha1/namespaces/{stack.namespace}/replicatedvolumes/{name}")
    await _assert_gone(stack, name)
    assert [d for d in dirs if d.exists()] == [], "Delete removes the data on every node that held a replica"


async def test_a_volume_whose_derived_names_are_taken_says_so_and_its_deletion_spares_their_owner(
    stack: Stack, volume: Any
) -> None:
    """Volume ``db``'s export Secret would be ``pairvol-db-export``: volume ``db-export``'s
    agents' Secret (its token and link key). ``db`` takes nothing of it, starts no agent,
    says why, and its deletion leaves ``db-export`` replicating with all its objects."""
    ns = stack.namespace
    await stack.apply(volume("db-export"))
    await stack.wait_phase("db-export", "Replicating", within=120)
    theirs = [await stack.kube.get(path) for path in (
        secrets_path(ns, "pairvol-db-export"), services_path(ns, "db-export"), services_path(ns, "db-export-agents"))]

    await stack.apply(volume("db"))

    async def told() -> dict[str, Any] | None:
        st = await stack.status("db")
        return st if "Secret pairvol-db-export" in str(st.get("message")) else None

    st = await stack.wait_for("db to report the taken name", told, within=30)
    assert st["phase"] == "Pending" and "ReplicatedVolume db-export" in st["message"]
    assert "NameTaken" in {e["reason"] for e in await stack.events("db")}
    assert await stack.pods("db") == [], "no agent may start with another volume's keys"

    await stack.kube.delete(f"/apis/pairvol.io/v1alpha1/namespaces/{ns}/replicatedvolumes/db")

    async def db_gone() -> bool:
        return await stack.kube.get_or_none(f"/apis/pairvol.io/v1alpha1/namespaces/{ns}/replicatedvolumes/db") is None

    await stack.wait_for("db to be deleted", db_gone, within=60)
    for before in theirs:
        meta = before["metadata"]
        path = (secrets_path if before["kind"] == "Secret" else services_path)(ns, meta["name"])
        after = await stack.kube.get(path)
        assert after["metadata"]["uid"] == meta["uid"], f"{before['kind']} {meta['name']} was deleted with db"
        assert after.get("data") == before.get("data")
    assert (await stack.status("db-export"))["phase"] == "Replicating"
